"""The server's side of a run: build the strategy, prescribe the mechanism, evaluate and report every round.

The round loop itself is Flower's (``Strategy.start``); fedshield hooks in through the strategy wrappers and the
``evaluate_fn`` callback, which runs after each round's aggregation and federated evaluation.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from .. import protocol as P
from ..config import RoundSettings, RunConfig
from ..data.partition import split_federated
from ..privacy.accounting import calibrate_noise_multiplier
from ..privacy.dpsgd import evaluate
from ..strategies.recording import RecordingStrategy
from ..tasks import get_task
from ..strategies.offset import RoundOffset
from .checkpoint import Checkpoint, capture_strategy_state, restore_strategy_state, save_checkpoint
from .report import PrivacyReport, RunWriter

__all__ = ["RoundRecord", "RunSummary", "run_server", "noise_multiplier_for"]

log = logging.getLogger(__name__)


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


def noise_multiplier_for(config: RunConfig) -> float:
    """Sigma for the whole run: given, or calibrated once so the last planned round lands on the budget."""
    if not config.dp:
        return 0.0
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    if config.epsilon is None:  # RunConfig already rejects this; kept for type narrowing
        raise ValueError("epsilon or noise multiplier required")
    return calibrate_noise_multiplier(
        target_epsilon=config.epsilon, delta=config.delta, sample_rate=config.sample_rate,
        steps=config.planned_steps, accountant=config.accountant,
    )


def build_strategy(config: RunConfig) -> RecordingStrategy:
    n = config.num_clients
    base: Strategy = FedAvg(
        fraction_train=config.fraction_train, fraction_evaluate=1.0, min_train_nodes=max(1, round(config.fraction_train * n)),
        min_evaluate_nodes=n, min_available_nodes=n,
    )
    if config.secagg:
        from ..strategies.secagg import SecAggPlus

        base = SecAggPlus(base)
    return RecordingStrategy(base)


def run_server(
    grid: Grid,
    config: RunConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    state_root: str = "",
    resume: Checkpoint | None = None,
) -> RunSummary:
    """Run (or, with ``resume``, continue) the rounds of ``config`` on ``grid``; checkpoint after every round."""
    task = get_task(config.task)
    # A resumed run keeps its mechanism: recalibrating could change sigma under the clients' ledgers.
    sigma = resume.noise_multiplier if resume is not None else noise_multiplier_for(config)
    summary = RunSummary(config, sigma)
    model = task.new_model(config.seed)
    server_test = None
    if task.load_bundled is not None:
        server_test = split_federated(task.load_bundled(), config.partition, 1, config.seed).server_test
    writer = RunWriter(config.out)
    writer.prepare(config)
    report = PrivacyReport(config, sigma)
    strategy = build_strategy(config)
    run_id = uuid.uuid4().hex[:12]
    done = 0
    initial = ArrayRecord(torch_state_dict=model.state_dict())
    if resume is not None:
        run_id, done = resume.run_id, resume.server_round
        restore_strategy_state(strategy, resume.strategy_state)
        report.load_state(resume.privacy_clients)
        writer.rounds = list(resume.rounds)
        summary.rounds = list(resume.rounds)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in resume.model.items()})
        initial = ArrayRecord(torch_state_dict=model.state_dict())

    def settings_for(server_round: int) -> RoundSettings:
        return RoundSettings(
            run_id=run_id, server_round=server_round, num_rounds=config.num_rounds, task=config.task,
            partition=str(config.partition), seed=config.seed, local_epochs=config.local_epochs, lr=config.lr,
            sample_rate=config.sample_rate, dp=config.dp, noise_multiplier=sigma, max_grad_norm=config.max_grad_norm,
            target_epsilon=config.epsilon or 0.0, delta=config.delta, accountant=config.accountant,
            grad_sample_mode=config.grad_sample_mode, sim_state_root=state_root,
        )

    clock = {"start": time.monotonic(), "last": time.monotonic()}

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = local_round + done if local_round else 0
        state = arrays.to_torch_state_dict()
        metrics: dict[str, float] = {}
        if server_test is not None:
            model.load_state_dict(state)
            loss, acc = evaluate(model, server_test, task.loss_fn())
            metrics = {"loss": loss, "accuracy": acc}
        if server_round == 0:
            clock["last"] = time.monotonic()
            return MetricRecord(metrics) if metrics else None
        _after_round(server_round, state, metrics)
        return MetricRecord(metrics) if metrics else None

    def _after_round(server_round: int, state: dict[str, torch.Tensor], metrics: dict[str, float]) -> None:
        now = time.monotonic()
        settings = settings_for(server_round)
        replies = strategy.last_replies
        report.record_round(settings, replies)
        fed = strategy.last_evaluate
        row = {
            "round": server_round,
            "accuracy": metrics.get("accuracy"),
            "loss": metrics.get("loss"),
            "federated_accuracy": None if fed is None else float(fed.get(P.EVAL_ACCURACY, float("nan"))),
            "federated_loss": None if fed is None else float(fed.get(P.EVAL_LOSS, float("nan"))),
            "clients_sampled": len(replies),
            "clients_trained": sum(r.ok for r in replies),
            "clients_refused": sum(bool(r.error and P.BUDGET_REFUSAL in r.error) for r in replies),
            "clients_failed": sum(bool(r.error and P.BUDGET_REFUSAL not in r.error) for r in replies),
            "epsilon_max": _json_float(report.max_epsilon()) if config.dp else None,
            "round_time_s": round(now - clock["last"], 3),
            "wall_time_s": round(now - clock["start"], 3),
        }
        clock["last"] = now
        writer.add_round(row)
        summary.rounds.append(row)
        privacy = report.to_json()
        summary.privacy = privacy
        writer.write_privacy(report)
        writer.write_model(state, {"round": str(server_round), "task": config.task, "run_id": run_id})
        save_checkpoint(config.out, Checkpoint(
            server_round=server_round, run_id=run_id, noise_multiplier=sigma,
            model={k: v.detach().cpu().numpy() for k, v in state.items()},
            strategy_state=capture_strategy_state(strategy), privacy_clients=report.to_state(),
            rounds=list(writer.rounds), config=config.to_flat_dict(),
        ))
        for r in replies:
            if not r.ok:
                log.warning("round %d: client %s did not contribute: %s", server_round, r.node_id, r.error)
        if on_round is not None:
            eps = {name: c["epsilon"] for name, c in privacy["clients"].items()}
            on_round(RoundRecord(server_round, config.num_rounds, row, eps))

    # Flower's strategies write "server-round" into this record before each round; every other RoundSettings
    # field is constant for the run, so one record serves every round.
    train_config = ConfigRecord(settings_for(1).to_record_dict())
    remaining = config.num_rounds - done
    if remaining > 0:
        RoundOffset(strategy, done).start(
            grid=grid, initial_arrays=initial, num_rounds=remaining, train_config=train_config,
            evaluate_config=ConfigRecord(settings_for(1).to_record_dict()), evaluate_fn=evaluate_fn,
        )
    writer.write_plots()
    return summary


def _json_float(x: float) -> float | None:
    return x if x == x and x not in (float("inf"), float("-inf")) else None
