"""Check every client update before it reaches aggregation; a bad one is rejected with a reason, never averaged.

One client must not be able to break a round for everybody: a NaN, an array of the wrong shape, a huge update or
a malformed reply is dropped here, reported in ``last_replies`` as an error ``fedshield:rejected: <reason>`` (the
run report counts it as a failed client), and the round goes on with the other clients.

Checks, in order: one ArrayRecord and one MetricRecord; the weight key present as a finite number >= 0; the same
array keys, shapes and dtypes as the global model sent this round; every value finite; the L2 norm of the update
``w_client - w_global`` within ``max_update_norm`` (if set); and the same metric keys as most other replies
(Flower's strategies raise for the whole round otherwise).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .. import protocol as P
from ..errors import ConfigError

__all__ = ["REJECTED", "UpdateValidation", "check_reply"]

_log = logging.getLogger(__name__)

#: Prefix of the error reason of a reply that failed validation.
REJECTED = "fedshield:rejected"


class UpdateValidation(Strategy):
    """Wrapper that screens train replies for ``inner``; everything else is forwarded unchanged.

    Args:
        inner: the strategy that aggregates the accepted replies.
        max_update_norm: bound on the L2 norm of ``w_client - w_global`` (None: no bound).
        weight_key: the metric the inner strategy weights by.

    After ``aggregate_train``, ``last_replies`` holds one :class:`~fedshield.protocol.ClientReply` per node asked or
    answering, sorted by node id. Replies are never modified; the accepted ones are handed on as they are.
    """

    def __init__(self, inner: Strategy, *, max_update_norm: float | None = None, weight_key: str | None = None) -> None:
        if max_update_norm is not None and not (max_update_norm > 0 and math.isfinite(max_update_norm)):
            raise ConfigError(f"max_update_norm must be a finite number > 0, got {max_update_norm}")
        self.inner = inner
        self.max_update_norm = max_update_norm
        self.weight_key = weight_key or str(getattr(inner, "weighted_by_key", P.NUM_EXAMPLES))
        self.last_replies: list[P.ClientReply] = []
        self._global: ArrayRecord | None = None
        self._asked: list[int] = []

    def summary(self) -> None:
        _log.info("update validation: max_update_norm=%s", self.max_update_norm)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._global = arrays
        self._asked = [m.metadata.dst_node_id for m in messages]
        self.last_replies = []
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # References only: Flower's start() holds this list anyway. Two passes are needed because the metric keys
        # to expect are those of most replies, which is known only once all have been seen.
        replies = list(replies)
        verdicts: dict[int, P.ClientReply] = {}
        common_keys = _common_metric_keys(replies)
        accepted = self._screen(server_round, replies, common_keys, verdicts)
        try:
            result = self.inner.aggregate_train(server_round, accepted)
        finally:
            for _ in accepted:  # finish screening if the inner strategy stopped early: every reply gets a verdict
                pass
            for node in self._asked:
                verdicts.setdefault(node, P.ClientReply(node, error="no reply before the round timed out"))
            self.last_replies = [verdicts[n] for n in sorted(verdicts)]
        return result

    def _screen(
        self, server_round: int, replies: list[Message], common_keys: frozenset[str] | None,
        verdicts: dict[int, P.ClientReply],
    ) -> Iterator[Message]:
        """Yield the acceptable replies one by one, recording every verdict (numeric checks run lazily)."""
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                verdicts[node] = P.ClientReply(node, error=str(msg.error.reason))
                continue
            reason = check_reply(msg, self._global, weight_key=self.weight_key,
                                 max_update_norm=self.max_update_norm, metric_keys=common_keys)
            if reason is not None:
                _log.warning("round %d: rejected the update of node %d: %s", server_round, node, reason)
                verdicts[node] = P.ClientReply(node, _numeric_metrics(msg), error=f"{REJECTED}: {reason}")
                continue
            verdicts[node] = P.ClientReply(node, _numeric_metrics(msg))
            yield msg

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)


def check_reply(
    msg: Message,
    global_arrays: ArrayRecord | None,
    *,
    weight_key: str = P.NUM_EXAMPLES,
    max_update_norm: float | None = None,
    metric_keys: frozenset[str] | None = None,
) -> str | None:
    """Why this train reply must not be aggregated, or None if it may be. Never modifies the reply."""
    content = msg.content
    if len(content.array_records) != 1 or len(content.metric_records) != 1:
        return (f"expected one ArrayRecord and one MetricRecord, got ArrayRecords {list(content.array_records)} "
                f"and MetricRecords {list(content.metric_records)}")
    metrics = next(iter(content.metric_records.values()))
    reason = _check_weight(metrics, weight_key)
    if reason is None and metric_keys is not None and frozenset(metrics.keys()) != metric_keys:
        reason = (f"its metric keys {sorted(metrics.keys())} differ from the other replies' {sorted(metric_keys)}")
    if reason is None and global_arrays is not None:
        reason = _check_arrays(next(iter(content.array_records.values())), global_arrays, max_update_norm)
    return reason


def _check_weight(metrics: MetricRecord, weight_key: str) -> str | None:
    weight = metrics.get(weight_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        return f"metric {weight_key!r} must be a number, got {weight!r}"
    if not (math.isfinite(weight) and weight >= 0):
        return f"metric {weight_key!r} must be a finite number >= 0, got {weight!r}"
    return None


def _check_arrays(arrays: ArrayRecord, global_arrays: ArrayRecord, max_update_norm: float | None) -> str | None:
    missing = [k for k in global_arrays if k not in arrays]
    extra = [k for k in arrays if k not in global_arrays]
    if missing or extra:
        return f"array keys differ from the global model's: missing {missing}, unexpected {extra}"
    for key, ref in global_arrays.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            return (f"{key!r} has shape {tuple(got.shape)} and dtype {got.dtype}; the global model's is "
                    f"{tuple(ref.shape)} {ref.dtype}")
    squared = 0.0
    for key, ref in global_arrays.items():
        value = arrays[key].numpy()
        bad = int(value.size - np.count_nonzero(np.isfinite(value))) if _is_inexact(value) else 0
        if bad:
            return f"{key!r} holds {bad} non-finite value(s) (NaN or infinity)"
        if max_update_norm is not None:
            diff = np.subtract(value, ref.numpy(), dtype=np.float64).ravel()
            squared += float(np.dot(diff, diff))
    if max_update_norm is not None and not math.sqrt(squared) <= max_update_norm:
        return f"update norm {math.sqrt(squared):.6g} exceeds max-update-norm {max_update_norm:g}"
    return None


def _is_inexact(value: np.ndarray[Any, Any]) -> bool:
    return bool(np.issubdtype(value.dtype, np.inexact))


def _common_metric_keys(replies: list[Message]) -> frozenset[str] | None:
    """The metric key set most well-formed replies share (ties: the larger set, then by name); None if none."""
    counts: Counter[frozenset[str]] = Counter()
    for msg in replies:
        if not msg.has_error() and len(msg.content.metric_records) == 1:
            counts[frozenset(next(iter(msg.content.metric_records.values())).keys())] += 1
    if not counts:
        return None
    return max(counts, key=lambda keys: (counts[keys], len(keys), sorted(keys)))


def _numeric_metrics(msg: Message) -> dict[str, float]:
    record = msg.content.metric_records.get(P.METRICS)
    if record is None and len(msg.content.metric_records) == 1:
        record = next(iter(msg.content.metric_records.values()))
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
