"""Distributed Skellam mechanism: the field arithmetic, the noise distribution, and equality with central DP-SGD."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedshield.client.distributed_step import flat_dim, poisson_sample, site_field_vector
from fedshield.privacy.rotation import RandomizedHadamard, round_seed
from fedshield.errors import PrivacyError
from fedshield.privacy.skellam import decode_sum, encode_site, plan, secure_rng, skellam_noise
from fedshield.strategies.distributed_dp import dp_sgd_step
from fedshield.tasks.builtin import digits_task


def test_rotation_is_orthonormal_and_shared() -> None:
    x = np.random.default_rng(0).normal(size=(4, 300))
    a, b = RandomizedHadamard(300, round_seed(7, 3)), RandomizedHadamard(300, round_seed(7, 3))
    y = a.forward(x)
    assert y.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-12)
    np.testing.assert_allclose(b.inverse(y), x, atol=1e-12)
    assert not np.array_equal(a.signs, RandomizedHadamard(300, round_seed(7, 4)).signs)


def test_summed_shares_are_skellam_of_the_total() -> None:
    """n sites' shares of Skellam(mu/h) sum to Skellam(n mu / h): chi-square against the exact pmf."""
    rng, n, share = secure_rng(), 5, 3.0
    total = sum(skellam_noise(200_000, share, rng) for _ in range(n))
    support = np.arange(-12, 13)
    observed = np.array([np.sum(total <= support[0])] + [np.sum(total == k) for k in support[1:-1]]
                        + [np.sum(total >= support[-1])])
    dist = stats.skellam(n * share, n * share)
    probs = np.concatenate([[dist.cdf(support[0])], dist.pmf(support[1:-1]), [dist.sf(support[-1] - 1)]])
    _, p_value = stats.chisquare(observed, probs * observed.sum())
    assert p_value > 1e-4, p_value
    assert abs(total.var() / (2 * n * share) - 1) < 0.02


def test_share_is_total_over_min_honest() -> None:
    p = plan(clip=1.0, noise_multiplier=1.1, dim=100, min_honest=3, num_sites=5, batch_bound=200)
    assert p.share_mu == pytest.approx(p.total_mu / 3)
    assert p.total_mu == pytest.approx((1.1 * p.l2_bound) ** 2 / 2)
    assert p.l2_bound >= p.clip * p.scale and p.l1_bound <= p.l2_bound**2
    with pytest.raises(PrivacyError, match="min_honest"):
        plan(clip=1.0, noise_multiplier=1.0, dim=100, min_honest=6, num_sites=5, batch_bound=200)


def test_noisy_sum_decodes_to_gradient_sum_plus_noise_of_sigma_c() -> None:
    dim, sites, rng = 1000, 4, np.random.default_rng(1)
    p = plan(clip=2.0, noise_multiplier=0.5, dim=dim, min_honest=2, num_sites=sites, batch_bound=64)
    rot = RandomizedHadamard(dim, round_seed(1, 1))
    rows = [rng.normal(size=(16, dim)) for _ in range(sites)]
    rows = [r * np.minimum(1, 2.0 / np.linalg.norm(r, axis=1))[:, None] for r in rows]
    field = sum(encode_site(r, p, rot, rounding_rng=rng, noise_rng=secure_rng()) for r in rows) % p.modulus
    error = decode_sum(field, p, rot) - sum(r.sum(axis=0) for r in rows)
    # 4 shares of total/2: the sum carries twice the guaranteed variance, std sqrt(2) * 0.5 * C per coordinate.
    assert error.std() == pytest.approx(np.sqrt(2) * 0.5 * 2.0, rel=0.1)


def test_encode_refuses_unclipped_rows() -> None:
    p = plan(clip=1.0, noise_multiplier=1.0, dim=8, min_honest=1, num_sites=2, batch_bound=4)
    with pytest.raises(PrivacyError, match="clip"):
        encode_site(np.full((1, 8), 1.0), p, RandomizedHadamard(8, b"s"), rounding_rng=np.random.default_rng(0),
                    noise_rng=None)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_noise_off_one_round_equals_central_dp_sgd_on_the_union() -> None:
    """Three sites' noise-free field vectors, decoded and stepped, == Opacus DP-SGD (sigma 0) on the union batch."""
    from opacus.optimizers import DPOptimizer
    from opacus import GradSampleModule

    task = digits_task()
    data, clip, q, lr = task.load_bundled(), 0.7, 0.1, 0.5
    parts = [type(data)(data.x[i::3], data.y[i::3]) for i in range(3)]
    model = task.new_model(0)
    dim = flat_dim(model)
    p = plan(clip=clip, noise_multiplier=0.0, dim=dim, min_honest=3, num_sites=3, batch_bound=400)
    rot = RandomizedHadamard(dim, round_seed(1, 1))
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    field = sum(site_field_vector(task.new_model(0), part, p, rot, sample_rate=q, loss_fn=task.loss_fn(),
                                  generator=g, noise_rng=None) for part, g in zip(parts, gens)) % p.modulus
    params = {k: v.detach().numpy().copy() for k, v in model.named_parameters()}
    expected_batch = q * len(data)
    ours = dp_sgd_step(params, field, p, rot, lr=lr, expected_batch=expected_batch)

    # Central: the same sampled records (same generators), Opacus' per-sample clipping and step, sigma 0.
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    idx = [poisson_sample(len(part), q, g) for part, g in zip(parts, gens)]
    x = torch.cat([torch.from_numpy(part.x[i.numpy()]) for part, i in zip(parts, idx)])
    y = torch.cat([torch.from_numpy(part.y[i.numpy()]) for part, i in zip(parts, idx)])
    central = task.new_model(0)
    gsm = GradSampleModule(central)
    opt = DPOptimizer(torch.optim.SGD(central.parameters(), lr=lr), noise_multiplier=0.0, max_grad_norm=clip,
                      expected_batch_size=int(expected_batch))
    torch.nn.functional.cross_entropy(gsm(x), y).backward()
    opt.step()
    # Opacus divides by the int expected batch; ours by q*N: compare on the same divisor.
    ratio = expected_batch / int(expected_batch)
    for key, value in central.named_parameters():
        start = params[key]
        np.testing.assert_allclose((start - ours[key]) * ratio, start - value.detach().numpy(), rtol=0, atol=2e-6)
    assert max(np.abs(params[k] - ours[k]).max() for k in params) > 1e-3  # the step is not empty
