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
from flwr.serverapp.strategy import Strategy

from .. import protocol as P
from ..config import RoundSettings, RunConfig
from ..data.partition import split_federated
from ..privacy.accounting import calibrate_noise_multiplier
from ..privacy.client_dp import accounting_sample_rate, calibrate_client_noise, check_shares_fit, noise_std_share
from ..privacy.dpsgd import evaluate
from ..strategies.recording import RecordingStrategy
from ..tasks import get_task
from ..tasks.files import whole_dataset
from ..tasks.partial import frozen_digest, load_travelling, travelling_state
from ..strategies.dequantize import DequantizeUpdates
from ..strategies.offset import RoundOffset
from ..strategies.client_dp import ClientLevelDP, find_client_dp
from ..strategies.registry import Sampling, build as build_named_strategy
from ..strategies.streaming import StreamingGrid
from ..strategies.validation import REJECTED, UpdateValidation
from .checkpoint import Checkpoint, capture_strategy_state, restore_strategy_state, save_checkpoint
from .report import PrivacyReport, RunWriter

__all__ = ["RoundRecord", "RunSummary", "run_server", "noise_multiplier_for", "client_noise_multiplier_for",
           "build_strategy"]

log = logging.getLogger(__name__)

#: Seconds between two pulls for replies. Replies stream into the aggregation as they arrive (StreamingGrid), so
#: the server holds one at a time instead of all; and a round ends at most this long after its last reply, where
#: Flower's deployment grid (HttpGrid) waits up to 3 s. Each pull is one cheap request to the SuperLink (in-process
#: in simulation), so 5 a second cost nothing measurable while a round lasts.
PULL_INTERVAL_S = 0.2


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


def client_noise_multiplier_for(config: RunConfig) -> float | None:
    """Client-level z for the whole run: given, or calibrated once for the planned rounds; None when off."""
    if config.client_dp == "off":
        return None
    if config.client_noise_multiplier is not None:
        return config.client_noise_multiplier
    if config.client_epsilon is None:  # RunConfig already rejects this; kept for type narrowing
        raise ValueError("client epsilon or client noise multiplier required")
    return calibrate_client_noise(
        target_epsilon=config.client_epsilon, delta=config.delta, rounds=config.num_rounds,
        sample_rate=accounting_sample_rate(sampling=config.client_sampling, fraction=config.fraction_train),
        accountant=config.accountant,
    )


def build_strategy(config: RunConfig, *, client_noise_multiplier: float | None = None) -> RecordingStrategy:
    """The run's wrapper chain, innermost first: the named Flower strategy; client-level DP; update validation;
    dequantisation; SecAgg+; recording. Validation sits outside client-level DP so a rejected update neither
    counts as a client nor contributes (or, in distributed mode, is accounted as) noise."""
    n = config.num_clients
    poisson = config.client_sampling == "poisson"
    sampling = Sampling(
        fraction_train=1.0 if poisson else config.fraction_train, fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=n if poisson else config.expected_train_clients,
        min_evaluate_nodes=config.expected_evaluate_clients, min_available_nodes=n,
    )
    base: Strategy = build_named_strategy(config.strategy, config.strategy_params, sampling=sampling)
    if config.client_dp != "off":
        z = client_noise_multiplier if client_noise_multiplier is not None else client_noise_multiplier_for(config)
        base = ClientLevelDP(
            base, mode=config.client_dp, noise_multiplier=float(z or 0.0), clip_norm=float(config.client_clip_norm or 0.0),
            num_clients=n, expected_clients=config.expected_train_clients, sampling=config.client_sampling,
            fraction=config.fraction_train, aggregated_replies=config.secagg, min_clients=2 if config.secagg else 1,
        )
    base = UpdateValidation(base, max_update_norm=config.max_update_norm)
    if config.quantize:
        base = DequantizeUpdates(base)
    if config.secagg:
        from ..strategies.secagg import SecAggPlus

        # Under DP every client weighs the public constant 1 (see client.trainer.reply_metrics), so SecAgg+'s
        # weight scale is 1. Its key exchange and unmasking stages wait as long for replies as the round's train
        # and evaluate exchanges.
        max_weight: dict[str, float] = {}
        if config.dp or config.client_dp != "off":
            max_weight = {"max_weight": 1.0}
            if config.quantize == 8:
                # The 8-bit default (+-0.25) was sized for updates scaled by examples/max_weight (230/1000 in the
                # default job); at weight 1 the same updates are 4.3x larger (max 0.48): +-1.0 keeps the 2x
                # headroom, and its step (2/255) still adds only ~0.2% to the entries' variance.
                max_weight["clipping_range"] = 1.0
        base = SecAggPlus(base, timeout=config.round_timeout, **config.secagg_params, **max_weight)
    if config.client_dp == "distributed" and not config.secagg:
        log.warning("--client-dp distributed without SecAgg+: the server sees each update with only its "
                    "1/sqrt(n) share of the noise; the client-level guarantee holds for the released model only")
    return RecordingStrategy(base)


def check_noise_shares(config: RunConfig, z: float | None) -> None:
    """Refuse (ConfigError) a distributed client-level DP run whose noise shares SecAgg+ would clip."""
    if config.client_dp != "distributed" or not config.secagg or z is None or config.client_clip_norm is None:
        return
    from ..strategies.secagg import DEFAULT_CLIPPING_RANGE

    check_shares_fit(clipping_range=DEFAULT_CLIPPING_RANGE[config.quantize], clip_norm=config.client_clip_norm,
                     noise_multiplier=z, expected_clients=config.expected_train_clients)


def _client_std_share(config: RunConfig, z: float | None) -> float:
    if config.client_dp != "distributed" or z is None or config.client_clip_norm is None:
        return 0.0
    expected = config.fraction_train * config.num_clients if config.client_sampling == "poisson" else config.expected_train_clients
    return noise_std_share(noise_multiplier=z, clip_norm=config.client_clip_norm, expected_clients=expected)


def run_server(
    grid: Grid,
    config: RunConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    state_root: str = "",
    resume: Checkpoint | None = None,
) -> RunSummary:
    """Run (or, with ``resume``, continue) the rounds of ``config`` on ``grid``; checkpoint after every round.

    The grid is wrapped in a :class:`~fedshield.strategies.streaming.StreamingGrid`, in simulation and deployment
    alike, so replies reach the aggregation as they arrive.
    """
    task = get_task(config.task)
    # A resumed run keeps its mechanism: recalibrating could change sigma under the clients' ledgers.
    sigma = resume.noise_multiplier if resume is not None else noise_multiplier_for(config)
    client_sigma = _resumed_client_sigma(resume) or client_noise_multiplier_for(config)
    check_noise_shares(config, client_sigma)
    summary = RunSummary(config, sigma)
    model = task.new_model(config.seed)
    server_test = None
    if task.load_bundled is not None or config.data:
        whole = whole_dataset(task, config.data, text_column=config.text_column, label_column=config.label_column)
        server_test = split_federated(whole, config.partition, 1, config.seed).server_test
    writer = RunWriter(config.out)
    writer.prepare(config)
    report = PrivacyReport(config, sigma, client_noise_multiplier=client_sigma)
    strategy = build_strategy(config, client_noise_multiplier=client_sigma)
    run_id = uuid.uuid4().hex[:12]
    done = 0
    initial = ArrayRecord(torch_state_dict=travelling_state(model))  # a partial model sends its trainable part
    digest = frozen_digest(model)
    if resume is not None:
        run_id, done = resume.run_id, resume.server_round
        restore_strategy_state(strategy, resume.strategy_state)
        report.load_state(resume.privacy_clients)
        report.load_client_level(resume.extra.get("client_level"))
        writer.rounds = list(resume.rounds)
        summary.rounds = list(resume.rounds)
        load_travelling(model, {k: torch.from_numpy(v.copy()) for k, v in resume.model.items()})
        initial = ArrayRecord(torch_state_dict=travelling_state(model))

    def settings_for(server_round: int) -> RoundSettings:
        return RoundSettings(
            run_id=run_id, server_round=server_round, num_rounds=config.num_rounds, task=config.task,
            partition=str(config.partition), seed=config.seed, local_epochs=config.local_epochs, lr=config.lr,
            sample_rate=config.sample_rate, dp=config.dp, noise_multiplier=sigma, max_grad_norm=config.max_grad_norm,
            target_epsilon=config.epsilon or 0.0, delta=config.delta, accountant=config.accountant,
            grad_sample_mode=config.grad_sample_mode, sim_state_root=state_root, quantize=config.quantize,
            proximal_mu=_proximal_mu(config), client_dp=config.client_dp,
            client_clip_norm=config.client_clip_norm or 0.0,
            client_noise_std_share=_client_std_share(config, client_sigma),
            device=config.device, max_physical_batch_size=config.max_physical_batch_size, amp=config.amp,
            frozen_digest=digest, sim_data=config.data, text_column=config.text_column,
            label_column=config.label_column,
        )

    clock = {"start": time.monotonic(), "last": time.monotonic()}

    def evaluate_fn(local_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round = local_round + done if local_round else 0
        state = arrays.to_torch_state_dict()
        metrics: dict[str, float] = {}
        if server_test is not None:
            load_travelling(model, state)
            loss, acc = evaluate(model, server_test, task.loss_fn())
            metrics = {"loss": loss, "accuracy": acc}
        if server_round == 0:
            clock["last"] = time.monotonic()
            return MetricRecord(metrics) if metrics else None
        _after_round(server_round, state, metrics)
        return MetricRecord(metrics) if metrics else None

    def _after_round(server_round: int, state: dict[str, torch.Tensor], metrics: dict[str, float]) -> None:
        now = time.monotonic()
        replies = strategy.last_replies
        _record_privacy(report, strategy, settings_for(server_round), replies)
        row = _round_row(server_round, metrics, strategy, replies, report, config, now, clock)
        clock["last"] = now
        writer.add_round(row)
        summary.rounds.append(row)
        # The checkpoint first: whatever fails in the reports below, the completed round can be resumed.
        save_checkpoint(config.out, Checkpoint(
            server_round=server_round, run_id=run_id, noise_multiplier=sigma,
            model={k: v.detach().cpu().numpy() for k, v in state.items()},
            strategy_state=capture_strategy_state(strategy), privacy_clients=report.to_state(),
            rounds=list(writer.rounds), config=config.to_flat_dict(),
            extra={"client_level": report.client_level_state(), "client_noise_multiplier": client_sigma},
        ))
        writer.write_model(state, {"round": str(server_round), "task": config.task, "run_id": run_id})
        privacy = report.to_json()
        summary.privacy = privacy
        writer.write_privacy(report)
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
            grid=_streaming(grid), initial_arrays=initial, num_rounds=remaining, timeout=config.round_timeout,
            train_config=train_config, evaluate_config=ConfigRecord(settings_for(1).to_record_dict()),
            evaluate_fn=evaluate_fn,
        )
    writer.write_plots()
    return summary


def _record_privacy(
    report: PrivacyReport, strategy: RecordingStrategy, settings: RoundSettings, replies: list[P.ClientReply]
) -> None:
    report.record_round(settings, replies)
    client_dp = find_client_dp(strategy)
    report.record_client_level(settings.server_round, None if client_dp is None else client_dp.last_event)


def _round_row(
    server_round: int, metrics: dict[str, float], strategy: RecordingStrategy, replies: list[P.ClientReply],
    report: PrivacyReport, config: RunConfig, now: float, clock: dict[str, float],
) -> dict[str, Any]:
    """One line of ``metrics.jsonl``: every figure finite or None (the file is strict JSON)."""
    fed = strategy.last_evaluate
    return {
        "round": server_round,
        "accuracy": metrics.get("accuracy"),
        "loss": metrics.get("loss"),
        "federated_accuracy": None if fed is None else _json_float(float(fed.get(P.EVAL_ACCURACY, float("nan")))),
        "federated_loss": None if fed is None else _json_float(float(fed.get(P.EVAL_LOSS, float("nan")))),
        "clients_sampled": len(replies),
        "clients_trained": sum(r.ok for r in replies),
        "clients_evaluated": strategy.last_evaluated,
        **_outcome_counts(replies),
        "failed": _failures(replies),
        "epsilon_max": _json_float(report.max_epsilon()) if config.dp else None,
        "bytes_up_per_client": round(sum(strategy.last_bytes_up) / len(strategy.last_bytes_up))
        if strategy.last_bytes_up else None,
        "round_time_s": round(now - clock["last"], 3),
        "wall_time_s": round(now - clock["start"], 3),
    }


def _streaming(grid: Grid) -> StreamingGrid:
    return grid if isinstance(grid, StreamingGrid) else StreamingGrid(grid, pull_interval=PULL_INTERVAL_S)


def _outcome_counts(replies: list[P.ClientReply]) -> dict[str, Any]:
    """The round's outcome columns: every client that did not train is counted in exactly one of refused (privacy
    budget spent), rejected (its update failed validation; ``rejected`` lists node and reason) or failed (an
    error reply, or no reply before the timeout)."""
    kinds = [_outcome(r) for r in replies]
    prefix = f"{REJECTED}: "
    return {
        "clients_refused": kinds.count("refused"),
        "clients_rejected": kinds.count("rejected"),
        "clients_failed": kinds.count("failed"),
        "rejected": [{"node_id": r.node_id, "reason": str(r.error).removeprefix(prefix)[:500]}
                     for r, kind in zip(replies, kinds) if kind == "rejected"],
    }


def _failures(replies: list[P.ClientReply]) -> list[dict[str, Any]]:
    """Node and reason of every client counted in ``clients_failed`` (e.g. "no reply before the round timed out")."""
    return [{"node_id": r.node_id, "reason": str(r.error)[:500]} for r in replies if _outcome(r) == "failed"]


def _outcome(reply: P.ClientReply) -> str:
    if reply.error is None:
        return "trained"
    if P.BUDGET_REFUSAL in reply.error:
        return "refused"
    return "rejected" if reply.error.startswith(REJECTED) else "failed"


def _proximal_mu(config: RunConfig) -> float:
    """FedProx's mu, sent to clients in the round settings (Flower's FedProx also writes it every round)."""
    if config.strategy != "fedprox":
        return 0.0
    return float(config.strategy_params.get("proximal_mu", 0.0))


def _resumed_client_sigma(resume: Checkpoint | None) -> float | None:
    value = None if resume is None else resume.extra.get("client_noise_multiplier")
    return None if value is None else float(value)


def _json_float(x: float) -> float | None:
    return x if x == x and x not in (float("inf"), float("-inf")) else None
