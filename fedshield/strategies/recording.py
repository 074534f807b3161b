"""A strategy wrapper that remembers what each client did in the last round, for reports and privacy accounting.

It forwards everything to the wrapped strategy and only looks at the replies: who was asked, who answered, who
failed and why. Under secure aggregation the wrapped :class:`~fedshield.strategies.secagg.SecAggPlus` already
knows the per-client outcome (it never exposes updates), so its ``last_replies`` are used instead of the raw,
masked replies.

Train replies pass through lazily, one at a time (:meth:`RecordingStrategy.aggregate_train`), so behind a
:class:`~fedshield.strategies.streaming.StreamingGrid` and a streaming inner strategy the server holds only the
reply being aggregated (and the rest of the batch its pull brought in). Evaluate replies carry metrics only; they
are listed, so an inner strategy may read them more than once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .. import protocol as P
from .clear_values import check_clear_metrics, usable_metrics
from .wrapper import StrategyWrapper, layers

__all__ = ["RecordingStrategy"]

_log = logging.getLogger(__name__)


class RecordingStrategy(StrategyWrapper):
    """Transparent wrapper; after each aggregate call, ``last_replies`` / ``last_evaluate`` describe that round."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.last_replies: list[P.ClientReply] = []
        self.last_train_metrics: MetricRecord | None = None
        self.last_evaluate: MetricRecord | None = None
        self.last_evaluated = 0  # evaluate replies without an error, last round
        self.last_bytes_up: list[int] = []
        self._asked: list[int] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._asked = [m.metadata.dst_node_id for m in messages]
        self.last_replies = []
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand the replies on as they come (one pass, nothing kept but each reply's size and outcome)."""
        self.last_bytes_up = []
        outcomes: dict[int, P.ClientReply] = {}
        stream = self._record(replies, outcomes)
        arrays, metrics = self.inner.aggregate_train(server_round, stream)
        for _ in stream:  # an inner strategy that stopped early: the rest still counts (and is pulled, then dropped)
            pass
        inner_view = _innermost_view(self.inner)
        self.last_replies = inner_view if inner_view is not None else self._with_timeouts(outcomes)
        self.last_train_metrics = metrics
        return arrays, metrics

    def _record(self, replies: Iterable[Message], outcomes: dict[int, P.ClientReply]) -> Iterator[Message]:
        """Yield each reply after noting its payload size and outcome; keeps none once the next is asked for."""
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                outcomes[node] = P.ClientReply(node, error=str(msg.error.reason))
            else:
                self.last_bytes_up.append(_payload_bytes(msg))
                record = msg.content.metric_records.get(P.METRICS, MetricRecord())
                outcomes[node] = P.ClientReply(node, usable_metrics(record))
            yield msg
            del msg  # let go before the next reply is pulled

    def _with_timeouts(self, outcomes: dict[int, P.ClientReply]) -> list[P.ClientReply]:
        for node in self._asked:
            outcomes.setdefault(node, P.ClientReply(node, error="no reply before the round timed out"))
        return [outcomes[n] for n in sorted(outcomes)]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.last_evaluate, self.last_evaluated = None, 0
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        # Metrics only, so a list costs little, and no inner strategy has to mind that a StreamingGrid's
        # iterator can be read only once.
        # A reply whose clear figures are out of range (NaN accuracy, a 1e12 count) is left out of the average.
        replies = [m for m in replies if m.has_error() or _clear_evaluate_ok(server_round, m)]
        self.last_evaluated = sum(not m.has_error() for m in replies)
        self.last_evaluate = self.inner.aggregate_evaluate(server_round, replies)
        return self.last_evaluate


def _clear_evaluate_ok(server_round: int, msg: Message) -> bool:
    if len(msg.content.metric_records) != 1:
        return True  # the inner strategy's own checks apply
    reason = check_clear_metrics(next(iter(msg.content.metric_records.values())))
    if reason is not None:
        _log.warning("round %d: left the evaluate reply of node %d out: %s", server_round,
                     msg.metadata.src_node_id, reason)
    return reason is None


def _payload_bytes(msg: Message) -> int:
    """Bytes of model data in a reply: its arrays, plus byte strings in config records (SecAgg+ masked vectors)."""
    total = sum(record.count_bytes() for record in msg.content.array_records.values())
    for record in msg.content.config_records.values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total


def _innermost_view(strategy: Strategy) -> list[P.ClientReply] | None:
    """The first wrapper down the ``.inner`` chain that knows per-client outcomes (SecAgg+, validation)."""
    for layer in layers(strategy):
        view = getattr(layer, "last_replies", None)
        if view is not None:
            return list(view)
    return None
