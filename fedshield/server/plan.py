"""What a run is before its first round: its mechanism (calibrated once), its identity, where it starts, and the
settings every round sends to the clients. Pure functions of the run's config and checkpoint: no files, no grid."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from ..protocol import RoundSettings
from ..privacy.accounting import calibrate_noise_multiplier
from ..privacy.client_level_mechanism import accounting_sample_rate, calibrate_client_noise, check_shares_fit, noise_std_share
from .checkpoint import Checkpoint
from .distributed import DistributedTerms, distributed_sigma, distributed_terms

__all__ = ["RunNoise", "RunPlan", "calibrate_run", "plan_run", "round_settings", "noise_multiplier_for",
           "client_noise_multiplier_for", "check_noise_shares"]


@dataclass(frozen=True)
class RunNoise:
    """A new run's mechanism: record-level sigma (0 without DP) and client-level z (None without client-level DP)."""

    sigma: float
    client_sigma: float | None


def calibrate_run(config: RunConfig) -> RunNoise:
    """Calibrate a new run's noise from its config alone (seconds of accountant work: Opacus' import and a PRV
    bisection). A deployed ServerApp does this before it waits for the sites, so the work overlaps their start and
    a config that cannot be calibrated fails before any site is kept waiting."""
    return RunNoise(noise_multiplier_for(config), client_noise_multiplier_for(config))


@dataclass(frozen=True)
class RunPlan:
    """The run's fixed facts.

    Attributes:
        config: the run's settings.
        run_id: names the run in every round's settings (a client ledger keys its charges by run and round).
        done: rounds completed before this process started (0, or the resumed checkpoint's round).
        noise_multiplier: record-level sigma for the whole run (0 without DP).
        client_noise_multiplier: client-level z (None without client-level DP).
        state_root: where simulated clients keep their ledgers ("" in deployment: each site has its own).
        distributed: the union's public sizes under ``--dp-mode distributed`` (None in local mode).
        frozen_digest: SHA-256 of a partial model's frozen weights, which never travel ("": every weight does).
    """

    config: RunConfig
    run_id: str
    done: int
    noise_multiplier: float
    client_noise_multiplier: float | None
    state_root: str = ""
    distributed: DistributedTerms | None = None
    frozen_digest: str = ""


def plan_run(config: RunConfig, resume: Checkpoint | None = None, *, state_root: str = "",
             frozen_digest: str = "", noise: RunNoise | None = None) -> RunPlan:
    """The plan of a new run (a fresh run id; ``noise`` as calibrated by :func:`calibrate_run`, calibrated now if
    not given) or of ``resume``'s continuation (``noise`` is ignored).

    A resumed run keeps its mechanism: recalibrating could change sigma under the clients' ledgers. Raises
    ConfigError if distributed client-level noise shares would not fit SecAgg+'s field.
    """
    if resume is None:
        noise = noise if noise is not None else calibrate_run(config)
        sigma, client_sigma = noise.sigma, noise.client_sigma
        run_id, done = uuid.uuid4().hex[:12], 0
    else:
        resumed = resume.extra.get("client_noise_multiplier")
        sigma = resume.noise_multiplier
        client_sigma = float(resumed) if resumed is not None else client_noise_multiplier_for(config)
        run_id, done = resume.run_id, resume.server_round
    check_noise_shares(config, client_sigma)
    terms = distributed_terms(config) if config.dp and config.dp_mode == "distributed" else None
    return RunPlan(config, run_id, done, sigma, client_sigma, state_root, terms, frozen_digest)


def round_settings(plan: RunPlan, server_round: int) -> RoundSettings:
    """What every client is told for ``server_round``; all but the round number is constant for the run."""
    c = plan.config
    return RoundSettings(
        run_id=plan.run_id, server_round=server_round, num_rounds=c.num_rounds, task=c.task,
        partition=str(c.partition), seed=c.seed, local_epochs=c.local_epochs, lr=c.lr, sample_rate=c.sample_rate,
        dp=c.dp, noise_multiplier=plan.noise_multiplier, max_grad_norm=c.max_grad_norm,
        target_epsilon=c.epsilon or 0.0, delta=c.delta, accountant=c.accountant, grad_sample_mode=c.grad_sample_mode,
        sim_state_root=plan.state_root, quantize=c.quantize, proximal_mu=_proximal_mu(c), client_dp=c.client_dp,
        client_clip_norm=c.client_clip_norm or 0.0,
        client_noise_std_share=_client_std_share(c, plan.client_noise_multiplier),
        device=c.device, max_physical_batch_size=c.max_physical_batch_size, amp=c.amp,
        frozen_digest=plan.frozen_digest, sim_data=c.data, text_column=c.text_column, label_column=c.label_column,
        **_distributed_settings(plan),
    )


def _distributed_settings(plan: RunPlan) -> dict[str, Any]:
    if plan.distributed is None:
        return {}
    c = plan.config
    return {"dp_mode": "distributed", "min_honest": c.min_honest_count, "ddp_sites": c.num_clients,
            "ddp_batch_bound": plan.distributed.batch_bound}


def noise_multiplier_for(config: RunConfig) -> float:
    """Sigma for the whole run: given, or calibrated once so the last planned round lands on the budget."""
    if not config.dp:
        return 0.0
    if config.dp_mode == "distributed":
        return distributed_sigma(config)
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
    poisson = config.client_sampling == "poisson"
    expected = config.fraction_train * config.num_clients if poisson else config.expected_train_clients
    return noise_std_share(noise_multiplier=z, clip_norm=config.client_clip_norm, expected_clients=expected)


def _proximal_mu(config: RunConfig) -> float:
    """FedProx's mu, sent to clients in the round settings (Flower's FedProx also writes it every round)."""
    if config.strategy != "fedprox":
        return 0.0
    return float(config.strategy_params.get("proximal_mu", 0.0))
