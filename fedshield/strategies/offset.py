"""Continue a run's round numbering after a resume.

Flower's ``Strategy.start`` always counts rounds from 1. A resumed run must tell clients (and their ledgers, which
key each charge by run and round) the true round number, so this wrapper shifts every round it forwards.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from .wrapper import StrategyWrapper

__all__ = ["RoundOffset"]


class RoundOffset(StrategyWrapper):
    """Forward to ``inner`` with ``server_round + offset``; attributes of ``inner`` stay reachable as ``.inner``."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        if offset < 0:
            raise ValueError(f"round offset must be >= 0, got {offset}")
        super().__init__(inner)
        self.offset = offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)
