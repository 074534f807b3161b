"""Range checks for every value a site sends in clear, before the server uses any of them.

A site's reply carries numbers the server reads directly: its example count (the aggregation weight), its ledger
figures (epsilon, steps), its training loss, its partition id. A hostile site can put anything there: NaN,
infinity, a negative count, 1e12 examples. Used unchecked, one such value crashed the report writer (``int(NaN)``),
overflowed the SecAgg+ field for every site (the summed weight wrapped) or let one site outweigh all the others.
So each clear value is checked here, generically (whatever keys a reply carries: the set changes with the client's
settings and version), and a reply that fails is dropped from its round with the reason, never the round itself.

What the server CAN check is only what arrives in clear; under SecAgg+ the weight folded into the masked vector is
invisible until the sum is unmasked, so a site that declares one count in clear and masks another is caught by the
integrity check on the sum, which cannot say which site lied (see :class:`~fedshield.strategies.secagg.SecAggPlus`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, MutableMapping

from .. import protocol as P

__all__ = ["DEFAULT_MAX_WEIGHT", "MAX_COUNT", "check_clear_metrics", "drop_bad_received", "usable_metrics"]

#: The agreed largest example count one reply weighs (SecAgg+'s ``max_weight``): a count above it aggregates at
#: this weight without SecAgg+; under SecAgg+ a count the field cannot hold is refused (see SecAggPlus).
DEFAULT_MAX_WEIGHT = 1000.0

#: Largest value a count-like figure (steps, rounds, partition id) may take: exact in a float64, and far beyond
#: anything a real site reaches.
MAX_COUNT = 2**53

#: Figures that count things: whole numbers >= 0.
COUNT_METRICS = (P.STEPS, P.ROUNDS_TRAINED, P.PARTITION_ID)
#: Figures that must be >= 0 (a negative epsilon would lower a site's reported spend; a weight may be fractional).
_NON_NEGATIVE = (P.NUM_EXAMPLES, P.EPSILON, P.TRAIN_LOSS, P.EVAL_LOSS, P.RECEIVED_EXAMPLES, P.RECEIVED_LOSS)


def check_clear_metrics(
    metrics: Mapping[str, object], *, weight_key: str = P.NUM_EXAMPLES, max_weight: float | None = None
) -> str | None:
    """Why these clear figures must not be used, or None if they may. Never modifies ``metrics``.

    Every value must be a finite number (bools and other types are refused: a MetricRecord holds numbers only);
    steps, rounds and partition ids are whole numbers in [0, 2**53]; the weight, epsilon and losses >= 0; accuracy in [0, 1]; the weight at most
    ``max_weight`` when that is given.
    """
    for key, value in metrics.items():
        reason = _check_value(key, value)
        if reason is not None:
            return reason
    weight = metrics.get(weight_key)
    if max_weight is not None and isinstance(weight, (int, float)) and weight > max_weight:
        return f"metric {weight_key!r} is {weight:g}, above the largest weight a reply may carry ({max_weight:g})"
    return None


def drop_bad_received(metrics: MutableMapping[str, object]) -> str | None:
    """Take a folded evaluation (``P.RECEIVED_KEYS``) that fails its checks, or is incomplete, out of ``metrics``
    and say why; None if there was none or it passed. The evaluation and the update are separate figures: a NaN
    loss on held-out data must not cost the round a site's update (as it did not when evaluation was its own
    message)."""
    present = [k for k in P.RECEIVED_KEYS if k in metrics]
    if not present:
        return None
    reason = "an incomplete evaluation" if len(present) != len(P.RECEIVED_KEYS) else check_clear_metrics(
        {k: metrics[k] for k in present})
    if reason is not None:
        for key in present:
            del metrics[key]
    return reason


def usable_metrics(metrics: Mapping[str, object]) -> dict[str, float]:
    """The scalar figures that pass :func:`check_clear_metrics`' per-value checks, as floats; the rest are left out.

    For the report of a dropped reply: its valid figures (a site's ledger epsilon, which the server's account
    takes as a floor) still count, a NaN or infinity never reaches the accounting or a JSON file."""
    return {k: float(v) for k, v in metrics.items()  # type: ignore[arg-type]
            if not isinstance(v, list) and _check_value(k, v) is None}


def _check_value(key: str, value: object) -> str | None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"metric {key!r} must be a number, got {type(v).__name__}"
        if not math.isfinite(v):
            return f"metric {key!r} must be finite, got {v!r}"
    if isinstance(value, list):
        return None
    if key in COUNT_METRICS and not (0 <= value <= MAX_COUNT and float(value).is_integer()):  # type: ignore[operator]
        return f"metric {key!r} must be a whole number in [0, 2**53], got {value!r}"
    if key in _NON_NEGATIVE and value < 0:  # type: ignore[operator]
        return f"metric {key!r} must be >= 0, got {value!r}"
    if key in (P.EVAL_ACCURACY, P.RECEIVED_ACCURACY) and not 0 <= value <= 1:  # type: ignore[operator]
        return f"metric {key!r} must be in [0, 1], got {value!r}"
    return None
