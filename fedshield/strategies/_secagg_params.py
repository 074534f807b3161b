"""SecAgg+ protocol parameters: checked when :class:`fedshield.strategies.secagg.SecAggPlus` is built, resolved per
round into counts (:func:`protocol_params`), and the neighbour ring.

A bad value (a threshold above the shares, a modulus too small for two clients' sums) would otherwise surface as
a failed unmasking several rounds in; each check names the parameter and a value that works.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

from flwr.app import ConfigRecord

from ..flower_internals.secagg_keys import Key, Stage
from ..compression import QUANT_BITS
from ..errors import ConfigError

__all__ = ["ProtocolParams", "check_bits", "check_params", "neighbour_graph", "protocol_params"]

_log = logging.getLogger("fedshield.strategies.secagg")


def check_params(
    num_shares: object, threshold: object, clipping_range: object, quantization_range: object,
    modulus_range: object, max_weight: object, timeout: object,
) -> None:
    _check_count_or_fraction("num_shares", num_shares, min_int=3)
    _check_count_or_fraction("reconstruction_threshold", threshold, min_int=2)
    if isinstance(num_shares, int) and isinstance(threshold, int) and threshold > num_shares:
        raise ConfigError(f"reconstruction_threshold ({threshold}) must be <= num_shares ({num_shares}): lower "
                          "the threshold or give more shares")
    if isinstance(threshold, float) and threshold <= 0.5:
        _log.warning("reconstruction_threshold %s <= 0.5: a server that lies about which nodes dropped can "
                     "rebuild both secrets of a node and unmask it; use a fraction above 0.5", threshold)
    if clipping_range is not None:
        _check_positive_real("clipping_range", clipping_range, "e.g. 8.0, or None for the field's default")
    _check_positive_real("max_weight", max_weight, "the largest example count a client reports")
    if timeout is not None:
        _check_positive_real("timeout", timeout, "seconds, or None to wait without limit")
    if not _is_int(quantization_range) or not 2 <= quantization_range < 2**31:  # type: ignore[operator]
        raise ConfigError(f"quantization_range must be an int in [2, 2**31) (clients quantise to int32), got "
                          f"{quantization_range!r}: e.g. 2**22")
    if not _is_int(modulus_range) or modulus_range <= 0 or bin(modulus_range).count("1") != 1:  # type: ignore
        raise ConfigError(f"modulus_range must be a power of two, got {modulus_range!r}: e.g. 2**32")
    if not 2 * quantization_range < modulus_range <= 2**32:  # type: ignore[operator]
        raise ConfigError(f"modulus_range must be in (2 x quantization_range, 2**32] so that at least two "
                          f"clients' sums fit, got {modulus_range!r} with quantization_range "
                          f"{quantization_range!r}: e.g. 2**32 with 2**22 (up to 1023 nodes)")


def check_bits(value: object, name: str) -> int:
    if not _is_int(value) or value not in (0, *QUANT_BITS):
        raise ConfigError(f"{name} must be 0 (full precision) or one of {QUANT_BITS} bits per value, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count_or_fraction(name: str, value: object, *, min_int: int) -> None:
    if _is_int(value):
        if value < min_int:  # type: ignore[operator]
            raise ConfigError(f"{name} as a count must be >= {min_int}, got {value!r}: use a larger count, or a "
                              "fraction such as 1.0 (all sampled nodes)")
    elif isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{name} as a fraction must be in (0, 1], got {value!r}: e.g. 1.0 or 0.66")
    else:
        raise ConfigError(f"{name} must be an int count or a float fraction, got {type(value).__name__} {value!r}")


def _check_positive_real(name: str, value: object, hint: str) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}: {hint}")


@dataclass(frozen=True)
class ProtocolParams:
    """The SecAgg+ settings of one round, as every sampled client receives them at SETUP."""

    num_samples: int
    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float
    #: Ask clients for masked vectors in the narrowest type that holds ``modulus_range`` (lossless).
    narrow_wire: bool = False

    def setup_record(self) -> ConfigRecord:
        # secaggplus_mod checks exact types (`type(v) is float`), hence the casts.
        return ConfigRecord(
            {
                Key.STAGE: Stage.SETUP,
                Key.SAMPLE_NUMBER: int(self.num_samples),
                Key.SHARE_NUMBER: int(self.num_shares),
                Key.THRESHOLD: int(self.threshold),
                Key.CLIPPING_RANGE: float(self.clipping_range),
                Key.TARGET_RANGE: int(self.quantization_range),
                Key.MOD_RANGE: int(self.modulus_range),
                Key.MAX_WEIGHT: float(self.max_weight),
            }
        )

    def q_ratio(self, num_examples: float) -> int:
        """The quantised weight a client folds into its vector: the same expression as ``secaggplus_mod``."""
        return round(num_examples / self.max_weight * self.quantization_range)


def protocol_params(
    num_samples: int,
    *,
    num_shares: int | float,
    threshold: int | float,
    clipping_range: float,
    quantization_range: int,
    modulus_range: int,
    max_weight: float,
    narrow_wire: bool = False,
) -> ProtocolParams:
    """Resolve fractions into counts for ``num_samples`` sampled nodes, as the legacy workflow does.

    Raises ConfigError when the settings cannot work for this many nodes; that recurs every round, so it must
    not pass as a dropout.
    """
    if num_samples < 2:
        raise ConfigError(
            f"SecAgg+ needs at least 2 sampled nodes per round, got {num_samples}: "
            "raise the inner strategy's min_train_nodes / fraction_train, or connect more nodes"
        )
    if num_samples * quantization_range >= modulus_range:
        raise ConfigError(
            f"{num_samples} sampled nodes x quantization_range {quantization_range} does not fit "
            f"modulus_range {modulus_range} (at most {(modulus_range - 1) // quantization_range} nodes): "
            "sample fewer nodes, lower quantization_range or raise modulus_range"
        )
    shares = _resolve_shares(num_shares, num_samples)
    # As the legacy workflow, at least 2: a threshold of 1 would let any single neighbour reveal a secret.
    t = max(round(threshold * shares), 2) if isinstance(threshold, float) else threshold
    if t > shares:
        raise ConfigError(
            f"reconstruction_threshold {t} exceeds the {shares} shares per key with {num_samples} sampled "
            "nodes: use a fractional threshold (e.g. 0.66) or sample more nodes"
        )
    return ProtocolParams(num_samples, shares, t, clipping_range, quantization_range, modulus_range, max_weight,
                          narrow_wire)


def _resolve_shares(num_shares: int | float, num_samples: int) -> int:
    if isinstance(num_shares, float):
        shares = round(num_shares * num_samples)
        shares = num_samples if shares <= 2 else shares
    else:
        shares = min(num_shares, num_samples)
    # The neighbourhood is the node plus half the shares on either side of it in a ring: an odd count,
    # unless it covers every node. The count is fixed before SETUP so clients and server agree on it.
    if shares < num_samples and shares % 2 == 0:
        shares += 1
    return min(shares, num_samples)


def neighbour_graph(node_ids: Iterable[int], num_shares: int, rng: random.Random) -> dict[int, frozenset[int]]:
    """Place nodes on a random ring; each node's neighbourhood is itself and ``num_shares // 2`` on each side."""
    ring = list(node_ids)
    rng.shuffle(ring)
    half, n = num_shares // 2, len(ring)
    return {nid: frozenset(ring[(i + off) % n] for off in range(-half, half + 1)) for i, nid in enumerate(ring)}
