"""The base of fedshield's strategy layers: a strategy around another, each step the inner one's unless overridden.

fedshield composes its server-side features (SecAgg+, client-level DP, update validation, dequantisation, round
offset, recording) as layers around one Flower strategy, so that strategy keeps its own aggregation and each layer
overrides only the steps it changes. A layer talks only to the one it wraps (``inner``); what layers must share
about a round goes through the one :class:`~fedshield.strategies.outcomes.RoundOutcomes` that
:func:`~fedshield.strategies.stack.build_strategy` hands them, never by walking ``.inner`` to look for attributes.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["StrategyWrapper"]


class StrategyWrapper(Strategy):
    """Forwards every :class:`~flwr.serverapp.strategy.Strategy` step to ``inner`` unchanged."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

