"""Accounting for the distributed Skellam mechanism with Poisson sampling of records, as pure functions.

A run's whole mechanism is a list of ``(total_mu, l1, l2, q, steps)`` entries (:class:`SkellamEntry`); epsilon is a
function of that list and delta alone, so privacy.json's figures recompute with :func:`epsilon`.

* **Base mechanism.** The multi-dimensional Skellam mechanism (each coordinate Poisson(mu) - Poisson(mu), the sum
  of the honest sites' shares) with L1/L2 sensitivities ``l1``/``l2`` is (alpha, eps)-RDP with
  ``eps(alpha) = alpha l2^2 / (4 mu) + min(((2 alpha - 1) l2^2 + 6 l1) / (16 mu^2), 3 l1 / (4 mu))``
  (Agarwal, Kairouz, Liu 2021, Theorem 3.5). Tested against a direct numerical Renyi divergence within 1%.
* **Poisson sampling of records.** Zhu & Wang (ICML 2019), Theorem 6: the general upper bound for *any* mechanism
  under Poisson subsampling (add/remove adjacency), integer alpha >= 2. It is valid for every sensitivity
  vector, not only the 1-D worst case, and its only slack is a factor of 3 on the terms of order >= 3.
* **Composition** over steps (RDP adds up) and conversion to (eps, delta) with Balle et al. 2020's bound
  (Opacus' and dp-accounting's): ``eps = rdp + log((a-1)/a) - (log delta + log a) / (a-1)``, minimised over alpha.

Why RDP rather than a PLD/PRV: this mechanism's literature and its closed form are RDP; a numerical PLD of the
subsampled multi-dimensional Skellam would need its worst-case sensitivity vector, which is not known to be 1-D.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.special import gammaln, logsumexp

from ..errors import ConfigError, PrivacyError

__all__ = ["SkellamEntry", "ALPHAS", "skellam_rdp", "subsampled_rdp", "rdp_to_epsilon", "epsilon", "calibrate"]

SkellamEntry = tuple[float, float, float, float, int]  # (total_mu, l1, l2, sample_rate, steps)
ALPHAS: tuple[int, ...] = tuple(range(2, 65)) + (80, 96, 128, 192, 256)


def skellam_rdp(alpha: float, *, mu: float, l1: float, l2: float) -> float:
    """Renyi DP of order ``alpha`` of Skellam(mu) noise (each Poisson of mean ``mu``) on a query of sensitivity
    ``l1``/``l2``; infinite without noise."""
    if mu <= 0:
        return math.inf
    return alpha * l2 * l2 / (4 * mu) + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (16 * mu * mu), 3 * l1 / (4 * mu))


def subsampled_rdp(alpha: int, q: float, base: Sequence[float]) -> float:
    """Zhu & Wang 2019, Theorem 6: RDP of order ``alpha`` of a mechanism run on a Poisson(q) sample.

    ``base[l]`` is the mechanism's RDP at order ``l`` for ``l = 0 .. alpha`` (entries 0 and 1 unused).
    """
    if q == 1.0:
        return float(base[alpha])
    if q == 0.0:
        return 0.0
    log_q, log_1q = math.log(q), math.log1p(-q)
    terms = [(alpha - 1) * log_1q + math.log1p(alpha * q - q)]
    terms.append(_log_binom(alpha, 2) + 2 * log_q + (alpha - 2) * log_1q + base[2])
    for l in range(3, alpha + 1):
        terms.append(math.log(3) + _log_binom(alpha, l) + l * log_q + (alpha - l) * log_1q + (l - 1) * base[l])
    return float(logsumexp(terms)) / (alpha - 1)


def _log_binom(n: int, k: int) -> float:
    return float(gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1))


def _entry_rdp(entry: Sequence[float]) -> np.ndarray:
    mu, l1, l2, q, steps = float(entry[0]), float(entry[1]), float(entry[2]), float(entry[3]), int(entry[4])
    if mu <= 0:
        return np.full(len(ALPHAS), math.inf)
    base = [0.0, 0.0] + [skellam_rdp(l, mu=mu, l1=l1, l2=l2) for l in range(2, max(ALPHAS) + 1)]
    return np.array([steps * subsampled_rdp(a, q, base) for a in ALPHAS])


def rdp_to_epsilon(rdp: Iterable[float], delta: float) -> tuple[float, int]:
    """``(epsilon, best alpha)`` from RDP values at :data:`ALPHAS` (Balle et al. 2020's conversion)."""
    values = np.array(list(rdp), dtype=float)
    a = np.array(ALPHAS, dtype=float)
    eps = values + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    best = int(np.nanargmin(eps))
    return max(0.0, float(eps[best])), ALPHAS[best]


def epsilon(history: Iterable[Sequence[float]], *, delta: float) -> float:
    """Epsilon spent by a history of :data:`SkellamEntry` at ``delta``; empty: 0, any noise-free step: inf."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    entries = [e for e in history if int(e[4]) > 0]
    if not entries:
        return 0.0
    total = sum((_entry_rdp(e) for e in entries), np.zeros(len(ALPHAS)))
    if not np.isfinite(total).any():
        return math.inf
    return rdp_to_epsilon(total, delta)[0]


def calibrate(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, l2_over_clip: float = 1.0,
              l1_l2_ratio: float = 0.0, tol: float = 1e-3) -> float:
    """Smallest noise multiplier z (noise variance ``(z l2)^2``) whose ``steps`` steps stay within the budget.

    The sensitivities enter through ``l1 / l2`` (``l1_l2_ratio``; 0 drops the L1 term, exact in the limit of a
    fine scale) at ``l2 = 1``: the RDP is scale-free up to the O(1/mu^2) term, which :func:`epsilon` on the real
    plan includes (callers re-check with it).
    """
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target epsilon must be a finite number > 0, got {target_epsilon}")

    def eps(z: float) -> float:
        l2 = 1e6 * l2_over_clip  # a fine scale: the L1 correction is then negligible
        return epsilon([(((z * l2) ** 2) / 2, l1_l2_ratio * l2, l2, sample_rate, steps)], delta=delta)

    lo, hi = 0.05, 1.0
    while eps(hi) > target_epsilon:
        hi *= 2
        if hi > 1e4:
            raise PrivacyError(f"no noise multiplier reaches epsilon {target_epsilon} in {steps} steps at q={sample_rate}")
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi
