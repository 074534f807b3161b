"""What a run hands its caller: a row per round for the CLI, and the run's summary at the end.

Plain data, in a module of its own so that the processes that only read a run (``fedshield server`` following
``metrics.jsonl``, the CLI printing rows) need neither torch nor Flower to build them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig

__all__ = ["RoundRecord", "RunSummary"]


@dataclass(frozen=True)
class RoundRecord:
    """What the CLI shows after each round."""

    server_round: int
    num_rounds: int
    row: dict[str, Any]
    client_epsilons: dict[str, float | None]


@dataclass
class RunSummary:
    config: RunConfig
    noise_multiplier: float
    rounds: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] = field(default_factory=dict)
