"""The distributed Skellam mechanism (Agarwal, Kairouz, Liu, NeurIPS 2021), record-level, exact in the SecAgg+ field.

Why integers: SecAgg+ sums integers modulo ``m``. Continuous Gaussian shares rounded into the field are not the
mechanism an accountant bounds; Skellam noise is integer-valued and the sum of Skellam shares is Skellam, so the
noise the server ends up with has exactly the distribution :mod:`.skellam_accountant` accounts for.

One site, one round (:func:`encode_site`): every Poisson-sampled record's gradient, already clipped to L2 norm ``C``,
is scaled by ``s`` (the granularity), rotated by the round's shared randomized Hadamard transform and rounded to
integers by *conditional* randomized rounding (re-drawn until its L2 norm is at most :attr:`SkellamPlan.l2_bound`,
as the paper bounds the norm after rounding). Rounding each record on its own (not the site's sum) is what makes
the record-level sensitivity exact: adding or removing one record changes the site's integer sum by exactly that
record's rounded vector, of L2 norm at most ``l2_bound`` and L1 norm at most ``l1_bound``. The site adds
Skellam noise (Poisson(mu) - Poisson(mu) per coordinate, ``mu = total_mu / min_honest``) and reduces mod ``m``.

The server (:func:`decode_sum`) reads the unmasked field sum as a centred residue in ``[-m/2, m/2)``, undoes the
rotation and the scale. ``m`` and ``s`` come from :func:`plan`: ``s`` is as large as the field allows while the noisy
sum of a round stays inside ``(-m/2, m/2)`` but with a negligible probability (the paper's modular clipping: a
wrapped coordinate is post-processing, it costs accuracy, never privacy).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray

from .rotation import RandomizedHadamard, padded_dim
from ..errors import PrivacyError

__all__ = ["SkellamPlan", "plan", "encode_site", "decode_sum", "skellam_noise", "conditional_round", "secure_rng"]

#: Standard deviations of noise (and tail width of a rotated coordinate) the field keeps inside (-m/2, m/2).
FIELD_SIGMAS = 8.0
_MAX_ROUNDING_TRIES = 1000


@dataclass(frozen=True)
class SkellamPlan:
    """Every public parameter of one round of the mechanism: written to privacy.json, enough to recompute epsilon.

    ``total_mu`` is the mean of each of the two Poissons of the noise on the sum when exactly ``min_honest`` sites
    add their share (variance ``2 * total_mu`` in field units); each site adds ``Skellam(share_mu)``.
    """

    clip: float
    scale: float
    dim: int
    padded_dim: int
    modulus: int
    beta: float
    noise_multiplier: float
    min_honest: int
    l2_bound: float
    l1_bound: float
    total_mu: float

    @property
    def share_mu(self) -> float:
        return self.total_mu / self.min_honest

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def plan(
    *, clip: float, noise_multiplier: float, dim: int, min_honest: int, num_sites: int, batch_bound: int,
    modulus: int = 2**32, beta: float = math.exp(-0.5),
) -> SkellamPlan:
    """Size the scale so that the noisy sum of ``num_sites`` sites (``batch_bound`` records in all) fits the field.

    ``noise_multiplier`` is relative to the L2 sensitivity after rounding: the sum's noise has variance
    ``(noise_multiplier * l2_bound)**2``, i.e. std ``noise_multiplier * C`` (to the rounding) in gradient units.
    ``beta`` is the paper's conditional-rounding parameter (the probability a rounding is re-drawn).
    """
    if not (clip > 0 and math.isfinite(clip)) or noise_multiplier < 0 or not 1 <= min_honest <= num_sites:
        raise PrivacyError(f"Skellam plan needs clip > 0, noise >= 0 and 1 <= min_honest ({min_honest}) <= sites "
                           f"({num_sites}); got clip {clip}, noise multiplier {noise_multiplier}")
    padded = padded_dim(dim)
    tail = math.sqrt(2 * math.log(2 * padded * 1e12))  # a rotated coordinate's tail, union over all coordinates
    per_unit = batch_bound * tail / math.sqrt(padded) + FIELD_SIGMAS * noise_multiplier * math.sqrt(
        num_sites / min_honest) * 1.01
    scaled_clip = (modulus / 2 - 2 * batch_bound - 2) / max(per_unit, 1e-12) * 0.9
    if scaled_clip < 4 * math.sqrt(padded):
        raise PrivacyError(f"a field of {modulus} cannot hold {num_sites} sites' noisy sums of dimension {dim}: "
                           "raise the modulus or lower the batch bound")
    l2 = _rounded_l2_bound(scaled_clip, padded, beta)
    l1 = min(l2 * l2, math.sqrt(padded) * l2)
    total_mu = (noise_multiplier * l2) ** 2 / 2
    return SkellamPlan(float(clip), scaled_clip / clip, int(dim), padded, int(modulus), float(beta),
                       float(noise_multiplier), int(min_honest), l2, l1, total_mu)


def _rounded_l2_bound(c: float, d: int, beta: float) -> float:
    """Agarwal et al. 2021, the norm bound of conditional randomized rounding of a vector of norm <= c."""
    sq = c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2)
    return min(math.sqrt(sq), c + math.sqrt(d))


def secure_rng() -> np.random.Generator:
    """A generator seeded with 256 bits from the OS CSPRNG: nobody can predict (and subtract) a deployed share."""
    return np.random.Generator(np.random.PCG64DXSM(int.from_bytes(os.urandom(32), "little")))


def skellam_noise(size: int, mu: float, rng: np.random.Generator) -> NDArray[np.int64]:
    """``size`` draws of Poisson(mu) - Poisson(mu): integer noise of variance ``2 mu``."""
    if mu == 0:
        return np.zeros(size, dtype=np.int64)
    return rng.poisson(mu, size).astype(np.int64) - rng.poisson(mu, size).astype(np.int64)


def conditional_round(rows: NDArray[np.float64], bound: float, rng: np.random.Generator) -> NDArray[np.int64]:
    """Unbiased randomized rounding of each row, re-drawn until the row's L2 norm is at most ``bound``."""
    floor = np.floor(rows)
    out = np.empty(rows.shape, dtype=np.int64)
    pending = np.arange(rows.shape[0])
    for _ in range(_MAX_ROUNDING_TRIES):
        if pending.size == 0:
            return out
        frac = rows[pending] - floor[pending]
        draw = floor[pending] + (rng.random(frac.shape) < frac)
        ok = np.linalg.norm(draw, axis=1) <= bound
        out[pending[ok]] = draw[ok].astype(np.int64)
        pending = pending[~ok]
    if pending.size == 0:
        return out
    raise PrivacyError(f"conditional rounding failed {_MAX_ROUNDING_TRIES} times: a clipped gradient is longer "
                       "than the plan's clip norm")


def encode_site(
    clipped: NDArray[np.floating], p: SkellamPlan, rotation: RandomizedHadamard, *,
    rounding_rng: np.random.Generator, noise_rng: np.random.Generator | None,
) -> NDArray[np.int64]:
    """One site's field vector: ``(sum_i round(R s g_i) + Skellam(share_mu)) mod m``, ``g_i`` clipped gradients.

    ``clipped``: ``(records, dim)`` per-record gradients of norm at most ``p.clip`` (checked). ``noise_rng``
    None adds no noise (tests of the noise-free mechanism only).
    """
    rows = np.asarray(clipped, dtype=np.float64).reshape(-1, p.dim)
    if rows.size and float(np.linalg.norm(rows, axis=1).max()) > p.clip * (1 + 1e-6):
        raise PrivacyError(f"a record's gradient is longer than the clip norm {p.clip}: clip before encoding")
    total = np.zeros(p.padded_dim, dtype=np.int64)
    if rows.shape[0]:
        rounded = conditional_round(rotation.forward(rows * p.scale), p.l2_bound, rounding_rng)
        total = rounded.sum(axis=0)
    if noise_rng is not None:
        total = total + skellam_noise(p.padded_dim, p.share_mu, noise_rng)
    return np.mod(total, p.modulus)


def decode_sum(field_sum: NDArray[np.integer], p: SkellamPlan, rotation: RandomizedHadamard) -> NDArray[np.float64]:
    """The sum of the sites' clipped gradients plus the noise, in gradient units, from the unmasked field sum."""
    residue = np.mod(np.asarray(field_sum, dtype=np.int64), p.modulus)
    centred = np.where(residue >= p.modulus // 2, residue - p.modulus, residue).astype(np.float64)
    return rotation.inverse(centred) / p.scale
