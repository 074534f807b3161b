"""The one object through which fedshield's strategy layers share what they learnt about the current round.

Strategy layers are wrappers (:class:`~fedshield.strategies.wrapper.StrategyWrapper`) and each sees the round from
its place in the stack: the recording layer sees the raw replies (their sizes), SecAgg+ knows which node's masked
vector made it into the sum, update validation judges each clear update, client-level DP knows what it released.
Instead of the report walking the layers to find whoever knows, :func:`~fedshield.strategies.stack.build_strategy`
creates ONE :class:`RoundOutcomes` and hands it to every layer that writes or reads it; the server's reporter reads
it after each round. Every per-client fact is keyed by the node id of the client's own reply (never a message a
layer rebuilt), so a client's outcome cannot land on another node.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import MetricRecord

from ..protocol import ClientReply

__all__ = ["ReleaseEvent", "RoundOutcomes"]


@dataclass(frozen=True)
class ReleaseEvent:
    """One private release (one round's aggregate): what the accountant needs, and what it was computed from."""

    server_round: int
    noise_multiplier: float  # effective z of this round's sum
    sample_rate: float  # q the accountant uses (1.0 for fixed-size sampling)
    included_clients: float  # m
    expected_clients: float  # n (fixed) or q N (Poisson)
    clipped: int = 0  # central mode: how many updates the clipping actually shrank


@dataclass
class RoundOutcomes:
    """What the last round did, written by the layer that knows each fact and read by the report.

    Writers (one per fact, chosen by ``build_strategy``):

    * ``replies``: one :class:`~fedshield.protocol.ClientReply` per node sampled or answering, sorted by node id.
      Written by the layer that sees each client's outcome: SecAgg+ under secure aggregation (it alone knows whose
      masked vector made it into the sum), else update validation (its verdict on each clear update). Under SecAgg+
      update validation judges the one aggregate and, if it rejects it, marks every included client rejected.
    * ``bytes_up``, ``train_metrics``, ``evaluate``, ``evaluated``, ``evaluated_round``: the recording layer, from
      what arrived (``evaluate`` of the previous round's model when the evaluation rode in this round's train
      messages, see :class:`~fedshield.strategies.recording.RecordingStrategy`).
    * ``release``: client-level DP, the round's release (None: nothing released, no privacy spent).
    """

    replies: list[ClientReply] = field(default_factory=list)
    bytes_up: list[int] = field(default_factory=list)
    train_metrics: MetricRecord | None = None
    evaluate: MetricRecord | None = None
    evaluated: int = 0  # evaluate replies without an error
    evaluated_round: int | None = None  # the round whose global model ``evaluate`` is of (0: the initial model)
    release: ReleaseEvent | None = None

    def settle(self, verdicts: Iterable[ClientReply]) -> None:
        """Set the round's per-client outcomes (replacing the last round's), sorted by node id."""
        self.replies = sorted(verdicts, key=lambda r: r.node_id)

    def reject_included(self, reason: str) -> None:
        """The aggregate of the clients that succeeded was rejected: each of them is reported with ``reason``."""
        self.replies = [r if not r.ok else ClientReply(r.node_id, r.metrics, error=reason) for r in self.replies]
