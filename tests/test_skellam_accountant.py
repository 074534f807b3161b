"""The Skellam accountant against independent computations: direct numerical Renyi divergences of the 1-D worst case
(L1 = L2 = Delta) and of a 2-D shift, with and without Poisson sampling, and Opacus' sampled Gaussian in the limit."""

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
def test_subsampled_bound_is_valid_in_both_directions_and_tight_for_the_numerical_mixture(alpha: int) -> None:
    """Above the exact subsampled divergence in both directions (add and remove), and within 1% of it."""
    q, mu, sens = 0.1, 5000.0, 100  # noise std 100: the noise multiplier ~1 regime of training
    shifted, base = _log_pmfs(mu, sens)
    mixture = np.logaddexp(math.log1p(-q) + base, math.log(q) + shifted)
    remove, add = _numeric_rdp(alpha, mixture, base), _numeric_rdp(alpha, base, mixture)
    rdp = [0.0, 0.0] + [skellam_rdp(l, mu=mu, l1=sens, l2=sens) for l in range(2, alpha + 1)]
    bound = subsampled_rdp(alpha, q, rdp)
    assert add <= remove * (1 + 1e-9)  # the module docstring's lemma, on the real distribution
    assert remove <= bound
    assert bound == pytest.approx(remove, rel=0.01)


@pytest.mark.parametrize("q", [0.05, 0.3])
def test_add_direction_is_below_remove_for_a_two_dimensional_shift(q: float) -> None:
    """The lemma on a product of two Skellams shifted by (3, -2): not 1-D, and the bound still holds both ways."""
    mu, v = 30.0, (3, -2)
    x = np.arange(-int(40 * math.sqrt(mu)) - 3, int(40 * math.sqrt(mu)) + 4)
    dist = stats.skellam(mu, mu)
    log_q = dist.logpmf(x)[:, None] + dist.logpmf(x)[None, :]
    log_p = dist.logpmf(x - v[0])[:, None] + dist.logpmf(x - v[1])[None, :]
    keep = np.isfinite(log_q) & np.isfinite(log_p)
    log_q, log_p = log_q[keep], log_p[keep]
    mixture = np.logaddexp(math.log1p(-q) + log_q, math.log(q) + log_p)
    l1, l2 = float(sum(abs(c) for c in v)), math.sqrt(sum(c * c for c in v))
    for alpha in (2, 4, 8, 16):
        remove, add = _numeric_rdp(alpha, mixture, log_q), _numeric_rdp(alpha, log_q, mixture)
        rdp = [0.0, 0.0] + [skellam_rdp(l, mu=mu, l1=l1, l2=l2) for l in range(2, alpha + 1)]
        assert add <= remove * (1 + 1e-9)
        assert remove <= subsampled_rdp(alpha, q, rdp)


def test_two_point_lemma_holds_on_a_grid() -> None:
    """The module docstring's lemma on one randomized-response pair, over r, q and alpha (the proof's only step)."""
    r = np.exp(np.linspace(1e-3, 12, 200))[:, None, None]
    q = np.linspace(1e-3, 0.999, 120)[None, :, None]
    alpha = np.array([1.5, 2, 3, 5, 8, 16, 32, 64, 128, 256])[None, None, :]
    log_a, log_b = np.log(1 - q + q * r), np.log(1 - q + q / r)
    log_pa, log_pb = -np.log1p(r), np.log(r) - np.log1p(r)
    remove = np.logaddexp(log_pa + alpha * log_a, log_pb + alpha * log_b)
    add = np.logaddexp(log_pa + (1 - alpha) * log_a, log_pb + (1 - alpha) * log_b)
    assert np.all(add <= remove + 1e-12)
    assert np.all(log_a + log_b >= -1e-15)  # a b >= 1


@pytest.mark.parametrize(("q", "sigma"), [(0.01, 1.1), (0.125, 1.97), (0.25, 0.8)])
def test_gaussian_limit_equals_opacus_sampled_gaussian_rdp(q: float, sigma: float) -> None:
    """With the Gaussian's RDP as the base (Skellam with mu -> inf, L1 term 0), the subsampling step is exactly
    Mironov et al.'s sampled Gaussian that Opacus computes."""
    from opacus.accountants.analysis.rdp import _compute_rdp

    for alpha in (2, 3, 5, 10, 32, 64):
        base = [0.0, 0.0] + [l / (2 * sigma * sigma) for l in range(2, alpha + 1)]
        assert subsampled_rdp(alpha, q, base) == pytest.approx(_compute_rdp(q, sigma, alpha), rel=1e-9)


def test_calibration_reaches_the_target_and_no_noise_is_infinite() -> None:
    z = calibrate(target_epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=40)
    assert epsilon([((z * 1e6) ** 2 / 2, 0.0, 1e6, 0.05, 40)], delta=1e-5) <= 3.0
    assert epsilon([((z * 0.98 * 1e6) ** 2 / 2, 0.0, 1e6, 0.05, 40)], delta=1e-5) > 3.0
    assert epsilon([(0.0, 1.0, 1.0, 0.05, 1)], delta=1e-5) == math.inf
    assert epsilon([], delta=1e-5) == 0.0
