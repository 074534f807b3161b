"""The one object that owns a run's records: the run directory, the privacy report and the checkpoint.

After each round :meth:`RunReporter.close_round` takes what the next round would change and
:meth:`RunReporter.record_closed` (later, on the runner's background thread) charges the round in the privacy
report, writes the checkpoint, then appends the round's row to ``metrics.jsonl`` and writes the model and
``privacy.json``. Every other file is replaced atomically, and the checkpoint (one file: model, strategy state,
privacy records, the rows metrics.jsonl does not hold yet) is written before the reports: whatever fails or is
killed after it, the completed round can be resumed, a kill before it leaves the
previous round's checkpoint to resume from, and a round in ``metrics.jsonl`` always has its checkpoint. The files
are written by a background thread while the next round runs
(:meth:`~fedshield.server.run_writer.RunWriter.round_files`), at most one round behind."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..privacy.accounting import cancel_prefetch, wait_prefetched
from ..strategies.outcomes import RoundOutcomes
from .accounting_ahead import prefetch_next_round, prefetch_planned_horizon
from .checkpoint import Checkpoint, capture_strategy_state, restore_strategy_state
from .plan import RunPlan, round_settings
from .records import RoundRecord, RunSummary
from .report import PrivacyReport
from .run_writer import RunWriter
from .round_row import round_row

__all__ = ["ClosedRound", "RunReporter"]

log = logging.getLogger(__name__)

StrategyState = dict[str, tuple[str, dict[str, np.ndarray]]]


@dataclass(frozen=True)
class ClosedRound:
    """A round as it ended (:meth:`RunReporter.close_round`), for a record that may be written later."""

    server_round: int
    state: dict[str, torch.Tensor]
    outcomes: RoundOutcomes
    strategy_state: StrategyState
    round_time_s: float
    wall_time_s: float


class RunReporter:
    """Writes the run directory of ``plan`` (``config.json`` at once) and keeps its privacy report.

    Args:
        plan: the run.
        stateful: the strategy layers whose state goes into the checkpoint (``StrategyStack.stateful``).
        clock: seconds, for the round and wall times in each row (monotonic).
        accounting_ahead: compute the planned run's client-level epsilon in the background from the first round
            (:func:`~fedshield.server.accounting_ahead.prefetch_planned_horizon`), so the final report finds it
            done. Right when rounds leave the machine idle (a deployment waits on its sites); a simulation on a
            small machine keeps every core busy, and there the background accountant slowed each round by half
            (Python's GIL, and the cores), so it computes the epsilon once, at the end.
    """

    def __init__(
        self, plan: RunPlan, stateful: Mapping[str, object], *, clock: Callable[[], float] = time.monotonic,
        accounting_ahead: bool = True,
    ) -> None:
        config = plan.config
        self.plan, self.stateful, self._clock = plan, stateful, clock
        self.writer = RunWriter(config.out)
        self.writer.prepare(config)
        self.report = PrivacyReport(config, plan.noise_multiplier, client_noise_multiplier=plan.client_noise_multiplier)
        self.summary = RunSummary(config, plan.noise_multiplier)
        self._start = self._last = clock()
        self._accounting_ahead = accounting_ahead

    def resume(self, ckpt: Checkpoint) -> None:
        """Continue from ``ckpt``: its strategy state, privacy records and rows."""
        restore_strategy_state(self.stateful, ckpt.strategy_state)
        self.report.load_state(ckpt.privacy_clients)
        self.report.load_client_level(ckpt.extra.get("client_level"))
        self.writer.rounds = list(ckpt.rounds)
        self.writer.write_metrics()  # metrics.jsonl as of the checkpoint: a later row dropped, a torn one repaired
        self.summary.rounds = list(ckpt.rounds)

    def start_round(self) -> None:
        """The next round's time counts from now (called after the initial evaluation); the epsilons its report
        will need start computing in the background (:mod:`.accounting_ahead`)."""
        prefetch_next_round(self.report, self.plan, self.plan.done + 1)
        if self._accounting_ahead:
            prefetch_planned_horizon(self.report, self.plan, self.plan.done + 1)
        self._last = self._clock()

    def record_round(
        self, server_round: int, state: dict[str, torch.Tensor], metrics: dict[str, float], outcomes: RoundOutcomes
    ) -> RoundRecord:
        """Record a completed round: privacy, row, checkpoint, model, privacy report (in that order)."""
        return self.record_closed(self.close_round(server_round, state, outcomes), metrics)

    def close_round(self, server_round: int, state: dict[str, torch.Tensor], outcomes: RoundOutcomes) -> ClosedRound:
        """The round as it ended, to record with :meth:`record_closed`, now or while the next round runs: its times,
        the outcomes (copied: the layers fill new lists next round) and the strategy layers' state as the checkpoint
        takes it (Flower's server optimisers replace, never modify, those arrays)."""
        now = self._clock()
        closed = ClosedRound(server_round, state, replace(outcomes, replies=list(outcomes.replies),
                                                          bytes_up=list(outcomes.bytes_up)),
                             capture_strategy_state(self.stateful), now - self._last, now - self._start)
        self._last = now
        return closed

    def record_closed(self, closed: ClosedRound, metrics: dict[str, float]) -> RoundRecord:
        """:meth:`record_round` of a round :meth:`close_round` took; rounds are recorded one at a time, in order."""
        server_round, state, outcomes = closed.server_round, closed.state, closed.outcomes
        self.report.record_round(round_settings(self.plan, server_round), outcomes.replies)
        self.report.record_client_level(server_round, outcomes.release)
        epsilon_max = self.report.max_epsilon() if self.plan.config.dp else None
        row = round_row(server_round, metrics, outcomes, epsilon_max=epsilon_max, round_time_s=closed.round_time_s,
                        wall_time_s=closed.wall_time_s)
        self.summary.rounds.append(row)
        # Encoded here, written in this order by the background writer while the next round runs (RunWriter).
        self.writer.rounds.append(row)
        with self.writer.round_files():
            # The checkpoint first: whatever fails or is killed after it, the completed round can be resumed, and
            # no report (metrics.jsonl, the model, privacy.json) ever shows a round that has no checkpoint.
            self.writer.write_checkpoint(self._checkpoint(server_round, state, closed.strategy_state))
            self.writer.write_metrics()
            meta = {"round": str(server_round), "task": self.plan.config.task, "run_id": self.plan.run_id}
            self.writer.write_model(state, meta)
            # Before the last planned round the client-level epsilon may still be computing: written as pending,
            # never waited for (it is the last round's, or finish()'s, report that has it).
            self.summary.privacy = self.report.to_json(final=server_round >= self.plan.config.num_rounds)
            self.writer.write_privacy(self.summary.privacy)
        prefetch_next_round(self.report, self.plan, server_round + 1)
        for r in outcomes.replies:
            if not r.ok:
                log.warning("round %d: client %s did not contribute: %s", server_round, r.node_id, r.error)
        eps = {name: c["epsilon"] for name, c in self.summary.privacy["clients"].items()}
        return RoundRecord(server_round, self.plan.config.num_rounds, row, eps)

    def finish(self) -> RunSummary:
        """Draw the plots; the run's summary. A speculative epsilon still computing (a history no client reached)
        is let finish first, so the process never exits under a thread that is inside NumPy."""
        cancel_prefetch()
        wait_prefetched(timeout=60.0)
        self.writer.flush()
        # A run that stopped early, or one resumed after its last round's checkpoint (no round left to report):
        # the final report, with every epsilon.
        if not self.summary.privacy or self.summary.privacy.get("client_level", {}).get("epsilon_pending"):
            self.summary.privacy = self.report.to_json()
            self.writer.write_privacy(self.summary.privacy)
        self.writer.write_plots()
        self.writer.close()
        return self.summary

    def abandon(self) -> None:
        """The run failed: write what is queued (the last completed round's files) and log a write that failed
        too, without hiding the run's own error."""
        try:
            self.writer.close()
        except Exception as exc:  # pylint: disable=broad-exception-caught  # the caller re-raises its own
            log.error("the last round's files could not be written either: %s: %s", type(exc).__name__, exc)

    def flush(self) -> None:
        """Wait until the last recorded round's files are on disk (they are written in the background)."""
        self.writer.flush()

    def _checkpoint(self, server_round: int, state: dict[str, torch.Tensor], strategy_state: StrategyState
                    ) -> Checkpoint:
        plan = self.plan
        return Checkpoint(
            server_round=server_round, run_id=plan.run_id, noise_multiplier=plan.noise_multiplier,
            model={k: v.detach().cpu().numpy() for k, v in state.items()},
            strategy_state=strategy_state, privacy_lines=self.report.state_lines(),
            rounds=list(self.writer.rounds), config=plan.config.to_flat_dict(),
            extra={"client_level": self.report.client_level_state(),
                   "client_noise_multiplier": plan.client_noise_multiplier},
        )
