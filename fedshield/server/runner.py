"""The server's side of a run: plan it, build the strategy, run Flower's round loop, report every round.

The round loop itself is Flower's (``Strategy.start``); fedshield hooks in through the strategy layers
(:func:`~fedshield.strategies.stack.build_strategy`) and the ``evaluate_fn`` callback, which runs after each
round's aggregation and federated evaluation: it evaluates the global model on the server's test split and hands
the round to the :class:`~fedshield.server.reporter.RunReporter`.
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid

from ..arrays import record_to_numpy
from ..config import RunConfig
from ..data.partition import server_test_split
from ..training import evaluate
from ..data.task_files import whole_dataset
from ..tasks.partial import frozen_digest, load_travelling, travelling_state
from ..strategies.offset import RoundOffset
from ..strategies.outcomes import RoundOutcomes
from ..strategies.stack import build_strategy
from ..strategies.streaming import StreamingGrid
from ..tasks import Task, get_task
from .checkpoint import Checkpoint
from .plan import (
    RunNoise, RunPlan, check_noise_shares, client_noise_multiplier_for, noise_multiplier_for, plan_run,
    round_settings,
)
from .records import RoundRecord, RunSummary
from .one_behind import OneBehind
from .reporter import ClosedRound, RunReporter

__all__ = ["RoundRecord", "RunSummary", "run_server", "noise_multiplier_for", "client_noise_multiplier_for",
           "build_strategy", "check_noise_shares"]

#: Seconds between two pulls for replies. Replies stream into the aggregation as they arrive (StreamingGrid), so
#: the server holds one at a time instead of all; and a round ends at most this long after its last reply, where
#: Flower's deployment grid (HttpGrid) waits up to 3 s. Each pull is one cheap request to the SuperLink (in-process
#: in simulation), so 5 a second cost nothing measurable while a round lasts.
PULL_INTERVAL_S = 0.2
#: For this long after a push and after each reply, pull every QUICK_PULL_S instead: a SecAgg+ UNMASK stage or a
#: short training stage ends within it (issue 13: a deployed SecAgg+ round waited ~0.1 s per stage on the pull
#: alone), and it bounds the extra requests to 40 per push or reply, whatever the round's length.
QUICK_PULL_S = 0.05
QUICK_WINDOW_S = 2.0

log = logging.getLogger(__name__)


def run_server(
    grid: Grid,
    config: RunConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    state_root: str = "",
    resume: Checkpoint | None = None,
    noise: RunNoise | None = None,
    accounting_ahead: bool = True,
) -> RunSummary:
    """Run (or, with ``resume``, continue) the rounds of ``config`` on ``grid``; checkpoint after every round.
    ``noise``: a new run's mechanism if already calibrated (:func:`~fedshield.server.plan.calibrate_run`).
    ``accounting_ahead``: see :class:`~fedshield.server.reporter.RunReporter`.

    The grid is wrapped in a :class:`~fedshield.strategies.streaming.StreamingGrid`, in simulation and deployment
    alike, so replies reach the aggregation as they arrive.
    """
    model = _initial_model(config, resume)
    # A partial model (frozen weights, e.g. a LoRA-adapted encoder) sends only its trainable tensors; every site
    # checks its frozen part against this digest.
    plan = plan_run(config, resume, state_root=state_root, frozen_digest=frozen_digest(model), noise=noise)
    distributed = _distributed_hooks(plan, model)
    stack = build_strategy(config, client_noise_multiplier=plan.client_noise_multiplier, distributed=distributed)
    reporter = RunReporter(plan, stack.stateful, accounting_ahead=accounting_ahead)
    if plan.distributed is not None:
        reporter.report.use_distributed(plan.distributed, _trainable_numel(model))
    if resume is not None:
        reporter.resume(resume)
    remaining = config.num_rounds - plan.done
    if remaining > 0:
        # Flower's strategies write "server-round" into these records before each round; every other
        # RoundSettings field is constant for the run, so one record serves every round.
        settings = round_settings(plan, 1).to_record_dict()
        after_round = _AfterRound(plan, model, reporter, stack.outcomes, on_round)
        try:
            RoundOffset(stack.top, plan.done).start(
                grid=_streaming(grid), initial_arrays=ArrayRecord(torch_state_dict=travelling_state(model)),
                num_rounds=remaining, timeout=config.round_timeout, train_config=ConfigRecord(settings),
                evaluate_config=ConfigRecord(settings), evaluate_fn=after_round,
            )
            after_round.close()
        except BaseException:
            after_round.abandon()
            reporter.abandon()  # the last completed round's files still reach the disk
            raise
    return reporter.finish()


class _AfterRound:
    """Flower's ``evaluate_fn``: the server-side test of the global model, then the round's report, both on one
    background thread while the next round trains.

    Why: the test and the report (checkpoint, rows, ``privacy.json``) took a simulated round's 10 ms on its
    critical path, with the clients idle (issue 13). What the next round would change is taken before it starts
    (:meth:`RunReporter.close_round`); a round's record starts after the previous one's files are on disk, so the
    record is at most one round behind, and its error is raised when the next round ends (or by :meth:`close`).
    The initial model is tested before round 1, in this thread: a test that cannot run (a model that does not fit
    the test data) fails the run before any site trains.
    """

    def __init__(
        self, plan: RunPlan, model: torch.nn.Module, reporter: RunReporter, outcomes: RoundOutcomes,
        on_round: Callable[[RoundRecord], None] | None,
    ) -> None:
        task = get_task(plan.config.task)
        self.plan, self.reporter, self.outcomes, self.on_round = plan, reporter, outcomes, on_round
        self.loss_fn = task.loss_fn()
        self.server_test = None
        c = plan.config
        if task.load_bundled is not None or c.data:  # the bundled data, or simulate's --data file
            whole = whole_dataset(task, c.data, text_column=c.text_column, label_column=c.label_column)
            self.server_test = server_test_split(whole, c.seed)
        self.model = _test_copy(task, model) if task.channels_last and self.server_test is not None else model
        self._behind = OneBehind("fedshield-after-round")

    def __call__(self, local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self._behind.wait()
        state = {k: torch.from_numpy(v) for k, v in record_to_numpy(arrays).items()}
        if local_round == 0:  # before round 1
            metrics = self._test(state)
            self.reporter.start_round()
            return MetricRecord(metrics) if metrics else None
        closed = self.reporter.close_round(local_round + self.plan.done, state, self.outcomes)
        self._behind.submit(self._record, closed)
        return None

    def _test(self, state: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.server_test is None:
            return {}
        load_travelling(self.model, state)
        loss, acc = evaluate(self.model, self.server_test, self.loss_fn)
        return {"loss": loss, "accuracy": acc}

    def _record(self, closed: ClosedRound) -> None:
        record = self.reporter.record_closed(closed, self._test(closed.state))
        self.reporter.flush()
        if self.on_round is not None:
            self.on_round(record)

    def close(self) -> None:
        """After the last round: wait for its record; raise what the record raised."""
        self._behind.close()

    def abandon(self) -> None:
        """The run failed: let the record in progress finish, and log (not raise) what it raised."""
        try:
            self._behind.close()
        except Exception as exc:  # pylint: disable=broad-exception-caught  # the caller re-raises its own
            log.error("the last round's record failed too: %s: %s", type(exc).__name__, exc)


def _test_copy(task: Task, model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model`` in channels-last memory format, for the server's test only (see ``Task.channels_last``):
    loading a round's weights into it keeps that format; the model whose weights go on the wire is left as it is."""
    return task.in_channels_last(copy.deepcopy(model))


def _initial_model(config: RunConfig, resume: Checkpoint | None) -> Any:
    """The task's model, seeded, or with the resumed checkpoint's weights."""
    model = get_task(config.task).new_model(config.seed)
    if resume is not None:
        load_travelling(model, {k: torch.from_numpy(v.copy()) for k, v in resume.model.items()})
    return model


def _distributed_hooks(plan: RunPlan, model: torch.nn.Module) -> dict[str, Any] | None:
    """DistributedSecAggPlus' arguments (it decodes Skellam field vectors of the trainable tensors); None in local
    mode."""
    if plan.distributed is None:
        return None
    return {"settings_for": functools.partial(round_settings, plan),
            "param_keys": [k for k, p in model.named_parameters() if p.requires_grad],
            "expected_batch": plan.distributed.expected_batch}


def _trainable_numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _streaming(grid: Grid) -> StreamingGrid:
    return grid if isinstance(grid, StreamingGrid) else StreamingGrid(grid, pull_interval=PULL_INTERVAL_S, quick_interval=QUICK_PULL_S, quick_window=QUICK_WINDOW_S)
