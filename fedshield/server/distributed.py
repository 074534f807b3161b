"""Server-side terms of ``--dp-mode distributed``: the union's public sizes, sigma, and what privacy.json states.

The union's record count ``N`` sizes two public numbers: the DP-SGD divisor (the expected batch ``q N``) and the
bound on a round's batch that sizes the field's scale. Neither touches the guarantee (a wrong ``N`` changes the
step size, or the odds of a modular wrap, never the noise); in simulation the server made the partitions and
knows ``N``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from ..data.partition import split_federated
from ..errors import ConfigError
from ..protocol import RoundSettings
from ..privacy.mechanisms import SKELLAM_ACCOUNTANT
from ..privacy.skellam_accountant import calibrate
from ..privacy.skellam_round import round_plan
from ..tasks import get_task

__all__ = ["DistributedTerms", "distributed_terms", "distributed_sigma", "skellam_entry", "mechanism_json", "TRUST"]

TRUST = ("SecAgg+ reveals only the sum; at least min_honest of a round's sites add their Skellam share (the others "
         "may drop out or collude with the server); sites refuse to unmask a round with fewer survivors")


@dataclass(frozen=True)
class DistributedTerms:
    records: int
    expected_batch: float
    batch_bound: int


def distributed_terms(config: RunConfig) -> DistributedTerms:
    """``N`` from ``--ddp-records``, else from the simulation's own partitions of a bundled task."""
    records = config.ddp_records
    if not records:
        task = get_task(config.task)
        if task.load_bundled is None:
            raise ConfigError("--dp-mode distributed with a task without bundled data needs --ddp-records N, a public "
                              "estimate of the sites' training records in all (it sets the DP-SGD divisor q*N)")
        split = split_federated(task.load_bundled(), config.partition, config.num_clients, config.seed)
        records = sum(len(train) for train, _ in split.clients)
    expected = config.sample_rate * records
    return DistributedTerms(int(records), expected, _batch_bound(expected))


def distributed_sigma(config: RunConfig) -> float:
    """Noise multiplier for the run: given, or calibrated once with the Skellam accountant for one step a round."""
    if config.noise_multiplier is not None:
        return config.noise_multiplier
    return calibrate(target_epsilon=float(config.epsilon or 0), delta=config.delta, sample_rate=config.sample_rate,
                     steps=config.num_rounds)


def skellam_entry(settings: RoundSettings, dim: int) -> tuple[float, float, float, float, int]:
    p = round_plan(settings, dim)
    return (p.total_mu, p.l1_bound, p.l2_bound, settings.sample_rate, 1)


def mechanism_json(settings: RoundSettings, dim: int, terms: DistributedTerms) -> dict[str, Any]:
    p = round_plan(settings, dim)
    return {
        "name": "distributed Skellam under SecAgg+ (Agarwal, Kairouz, Liu 2021), record-level, one DP-SGD step a "
                "round over the union of the sites' records",
        "accountant": SKELLAM_ACCOUNTANT,
        "accounting": "Skellam RDP (closed form, L1 and L2 sensitivity after rotation and rounding), Poisson "
                      "subsampling of records by the exact binomial expansion of the sampled mixture (remove "
                      "direction; the add direction is never larger for symmetric noise: "
                      "privacy/skellam_accountant.py), RDP composition, Balle et al. 2020 conversion",
        "history_entry": "[total_mu, l1, l2, sample_rate, steps]",
        "plan": p.to_json(),
        "share_mu": p.share_mu,
        "expected_batch": terms.expected_batch,
        "batch_bound": terms.batch_bound,
        "trust": TRUST,
        "min_honest": settings.min_honest,
    }


def _batch_bound(expected: float) -> int:
    return int(math.ceil(expected + 10 * math.sqrt(max(expected, 1.0)) + 10))
