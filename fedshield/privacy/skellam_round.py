"""One round's Skellam plan and rotation, from the public round settings alone.

Both sides call these: every site (to encode) and the server (to decode) derive the same plan and rotation, so the
server cannot hand a site a smaller noise share or a rotation of its choosing.
"""

from __future__ import annotations

from ..protocol import RoundSettings
from .rotation import RandomizedHadamard, round_seed
from .skellam import SkellamPlan, plan

__all__ = ["SKELLAM_MODULUS", "round_plan", "round_rotation"]

#: The SecAgg+ field of distributed rounds: fedshield's full-precision field (the largest SecAgg+ allows).
SKELLAM_MODULUS = 2**32


def round_plan(settings: RoundSettings, dim: int) -> SkellamPlan:
    return plan(clip=settings.max_grad_norm, noise_multiplier=settings.noise_multiplier, dim=dim,
                min_honest=settings.min_honest, num_sites=settings.ddp_sites, batch_bound=settings.ddp_batch_bound,
                modulus=SKELLAM_MODULUS)


def round_rotation(settings: RoundSettings, dim: int) -> RandomizedHadamard:
    return RandomizedHadamard(dim, round_seed(settings.run_id, settings.server_round))
