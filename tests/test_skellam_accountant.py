"""The Skellam accountant against an independent numerical computation on the 1-D worst case (L1 = L2 = Delta)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from fedshield.privacy.skellam_accountant import ALPHAS, calibrate, epsilon, rdp_to_epsilon, skellam_rdp, subsampled_rdp

MU, DELTA_SENS = 400.0, 8  # each Poisson's mean, and an integer shift (1-D: L1 = L2 = Delta)


def _log_pmfs(mu: float, shift: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(-int(60 * math.sqrt(mu)) - shift, int(60 * math.sqrt(mu)) + shift + 1)
    dist = stats.skellam(mu, mu)
    shifted, base = dist.logpmf(x - shift), dist.logpmf(x)
    keep = np.isfinite(shifted) & np.isfinite(base)  # beyond ~40 sd the pmf underflows; its mass is < 1e-300
    return shifted[keep], base[keep]


def _numeric_rdp(alpha: float, log_p: np.ndarray, log_q: np.ndarray) -> float:
    """D_alpha(P || Q) = log sum p^alpha q^(1-alpha) / (alpha - 1), summed over the integer support."""
    return float(logsumexp(alpha * log_p + (1 - alpha) * log_q)) / (alpha - 1)


@pytest.mark.parametrize("alpha", [2, 4, 8, 16])
def test_closed_form_rdp_matches_numerical_divergence(alpha: int) -> None:
    shifted, base = _log_pmfs(MU, DELTA_SENS)
    numeric = max(_numeric_rdp(alpha, shifted, base), _numeric_rdp(alpha, base, shifted))
    closed = skellam_rdp(alpha, mu=MU, l1=DELTA_SENS, l2=DELTA_SENS)
    assert closed >= numeric * (1 - 1e-9)  # a bound
    assert closed == pytest.approx(numeric, rel=0.01)


def test_epsilon_matches_numerical_rdp_composition_within_one_percent() -> None:
    shifted, base = _log_pmfs(MU, DELTA_SENS)
    steps = 50
    numeric = [steps * max(_numeric_rdp(a, shifted, base), _numeric_rdp(a, base, shifted)) for a in ALPHAS]
    ours = epsilon([(MU, DELTA_SENS, DELTA_SENS, 1.0, steps)], delta=1e-5)
    assert ours == pytest.approx(rdp_to_epsilon(numeric, 1e-5)[0], rel=0.01)


@pytest.mark.parametrize("alpha", [2, 3, 6, 12])
def test_subsampled_bound_is_valid_for_the_numerical_mixture(alpha: int) -> None:
    """Zhu-Wang's bound is above the exact subsampled divergence, in both directions (add and remove)."""
    q, mu, sens = 0.1, 5000.0, 100  # noise std 100: the noise multiplier ~1 regime of training
    shifted, base = _log_pmfs(mu, sens)
    mixture = np.logaddexp(math.log1p(-q) + base, math.log(q) + shifted)
    numeric = max(_numeric_rdp(alpha, mixture, base), _numeric_rdp(alpha, base, mixture))
    rdp = [0.0, 0.0] + [skellam_rdp(l, mu=mu, l1=sens, l2=sens) for l in range(2, alpha + 1)]
    bound = subsampled_rdp(alpha, q, rdp)
    assert numeric <= bound
    assert bound <= 2 * numeric  # and not vacuous (the factor 3 on orders >= 3 costs up to ~1.6x here)


def test_calibration_reaches_the_target_and_no_noise_is_infinite() -> None:
    z = calibrate(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=40)
    assert epsilon([((z * 1e6) ** 2 / 2, 0.0, 1e6, 0.05, 40)], delta=1e-5) <= 3.0
    assert epsilon([((z * 0.98 * 1e6) ** 2 / 2, 0.0, 1e6, 0.05, 40)], delta=1e-5) > 3.0
    assert epsilon([(0.0, 1.0, 1.0, 0.05, 1)], delta=1e-5) == math.inf
    assert epsilon([], delta=1e-5) == 0.0
