"""One site round of ``--dp-mode distributed``: check the trust assumption, charge the ledger, send field integers.

The round config names the public mechanism inputs (clip, noise multiplier, min-honest, sites, batch bound); the
site rebuilds the :class:`~fedshield.privacy.skellam.SkellamPlan` from them itself, so a server cannot hand it a
smaller noise share than the stated assumption needs. Its reply's one array is the Skellam field vector, which
fedshield's SecAgg+ client masks as is (:mod:`fedshield.client.secaggplus`); the reply's ``min-honest`` makes
that client refuse to unmask a round in which fewer sites survived.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import protocol as P
from ..protocol import RoundSettings
from ..privacy.skellam import secure_rng
from ..privacy.skellam_round import round_plan, round_rotation
from .distributed_step import flat_dim, site_field_vector
from .policy import ledger_terms
from .site import Site

__all__ = ["distributed_train_round"]


def distributed_train_round(site: Site, settings: RoundSettings, global_state: dict[str, torch.Tensor],
                            generator: torch.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """``(field vector, reply metrics)``; charges the site's ledger first (raises BudgetExhaustedError)."""
    from ..privacy.skellam_ledger import charge_skellam

    model = site.task.new_model(settings.seed)
    model.load_state_dict(global_state, strict=True)
    dim = flat_dim(model)
    p = round_plan(settings, dim)
    _, delta, budget = ledger_terms(site.policy, accountant=settings.accountant, delta=settings.delta,
                                    target_epsilon=settings.target_epsilon, site_budget=site.budget)
    entry = [p.total_mu, p.l1_bound, p.l2_bound, settings.sample_rate, 1]
    eps = charge_skellam(site.state_dir, entry=entry, delta=delta, budget=budget, run_id=settings.run_id,
                         server_round=settings.server_round)
    # A deployed site draws its share from the OS CSPRNG; a simulated one from its seeded generator (reproducible).
    noise = secure_rng() if site.partition_id is None else np.random.default_rng(
        int(torch.randint(0, 2**62, (1,), generator=generator)))
    vector = site_field_vector(model, site.train, p, round_rotation(settings, dim), sample_rate=settings.sample_rate,
                               loss_fn=site.task.loss_fn(), generator=generator, noise_rng=noise)
    metrics = {P.EPSILON: eps, P.DELTA: delta, P.MIN_HONEST: float(settings.min_honest)}
    return vector.astype(np.int64), metrics
