"""A strategy wrapper that remembers what each client did in the last round, for reports and privacy accounting.

It forwards everything to the wrapped strategy and only looks at the replies: who was asked, who answered, who
failed and why. Under secure aggregation the wrapped :class:`~fedshield.strategies.secagg.SecAggPlus` already
knows the per-client outcome (it never exposes updates), so its ``last_replies`` are used instead of the raw,
masked replies.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .. import protocol as P

__all__ = ["RecordingStrategy"]


class RecordingStrategy(Strategy):
    """Transparent wrapper; after each aggregate call, ``last_replies`` / ``last_evaluate`` describe that round."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.last_replies: list[P.ClientReply] = []
        self.last_train_metrics: MetricRecord | None = None
        self.last_evaluate: MetricRecord | None = None
        self.last_bytes_up: list[int] = []
        self._asked: list[int] = []

    def summary(self) -> None:
        self.inner.summary()

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
        replies = list(replies)
        self.last_bytes_up = [_payload_bytes(m) for m in replies if not m.has_error()]
        arrays, metrics = self.inner.aggregate_train(server_round, replies)
        inner_view = _innermost_view(self.inner)
        self.last_replies = list(inner_view) if inner_view is not None else self._from_raw(replies)
        self.last_train_metrics = metrics
        return arrays, metrics

    def _from_raw(self, replies: list[Message]) -> list[P.ClientReply]:
        seen: dict[int, P.ClientReply] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                seen[node] = P.ClientReply(node, error=str(msg.error.reason))
            else:
                record = msg.content.metric_records.get(P.METRICS, MetricRecord())
                seen[node] = P.ClientReply(node, {k: float(v) for k, v in record.items() if isinstance(v, (int, float))})
        for node in self._asked:
            seen.setdefault(node, P.ClientReply(node, error="no reply before the round timed out"))
        return [seen[n] for n in sorted(seen)]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.last_evaluate = None
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        self.last_evaluate = self.inner.aggregate_evaluate(server_round, replies)
        return self.last_evaluate


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
    node: object | None = strategy
    while node is not None:
        view = getattr(node, "last_replies", None)
        if view is not None:
            return list(view)
        node = getattr(node, "inner", None)
    return None
