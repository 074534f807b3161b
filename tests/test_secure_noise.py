"""The CSPRNG Gaussian sampler (ChaCha20, Opacus secure_mode's mitigation): its distribution, DP-SGD with it, and
that a deployed site uses it while a simulated client keeps the seeded generator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from fedshield import protocol as P
from fedshield.client import trainer
from fedshield.client.site import Site
from fedshield.client.trainer import train_round
from fedshield.config import RoundSettings
from fedshield.dataspec import Dataset
from fedshield.privacy.dpsgd import train_dp_sgd
from fedshield.training import evaluate, make_generator
from fedshield.privacy.secure_noise import SecureGaussian
from fedshield.tasks import get_task


def test_secure_gaussian_is_standard_normal() -> None:
    n = 400_000
    x = SecureGaussian().standard_normal((n,))
    assert x.dtype == np.float64 and x.shape == (n,)
    assert abs(x.mean()) < 5 / np.sqrt(n)
    assert abs(x.var() - 1.0) < 5 * np.sqrt(2 / n)
    assert abs(stats.kurtosis(x)) < 5 * np.sqrt(24 / n)  # a normal's excess kurtosis is 0
    assert stats.kstest(x, "norm").pvalue > 1e-4
    assert not np.array_equal(SecureGaussian().standard_normal(64), SecureGaussian().standard_normal(64))


def test_noise_tensor_follows_opacus_contract() -> None:
    ref = torch.zeros(300, 200, dtype=torch.float32)
    noise = SecureGaussian().noise(0.5, ref)
    assert noise.shape == ref.shape and noise.dtype == torch.float32
    assert float(noise.double().std()) == pytest.approx(0.5, rel=0.02)
    assert torch.equal(SecureGaussian().noise(0.0, ref), ref)
    assert SecureGaussian().standard_normal(()).shape == () and SecureGaussian().standard_normal(0).shape == (0,)


def _breast_cancer(n: int = 200) -> tuple[object, Dataset]:
    task = get_task("breast-cancer")
    data = task.load_bundled()
    return task, Dataset(data.x[:n], data.y[:n])


def _train(secure: SecureGaussian | None, *, sigma: float = 1.0) -> tuple[torch.nn.Module, bool]:
    task, data = _breast_cancer()
    model = task.new_model(0)
    result = train_dp_sgd(model, data, noise_multiplier=sigma, max_grad_norm=1.0, sample_rate=0.25, epochs=4,
                          lr=0.5, loss_fn=task.loss_fn(), generator=make_generator(7), grad_sample_mode="hooks",
                          secure_noise=secure)
    return model, result.secure_noise


def test_dp_sgd_with_secure_noise_trains_and_its_noise_is_not_the_seeded_one() -> None:
    task, data = _breast_cancer()
    (a, secure_a), (b, _) = _train(SecureGaussian()), _train(SecureGaussian())
    (c, secure_c), (d, _) = _train(None), _train(None)
    assert secure_a and not secure_c
    flat = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])  # noqa: E731
    assert torch.equal(flat(c), flat(d)), "seeded runs must be reproducible"
    assert not torch.allclose(flat(a), flat(b)), "secure noise must not depend on the seeded generator"
    _, acc = evaluate(a, data, task.loss_fn())
    assert 0.75 < acc < 1.0, acc  # learns under DP (chance ~0.63), yet not silently noise-free
    # Huge noise drowns the signal: privacy is on in the secure path too.
    noisy, _ = _train(SecureGaussian(), sigma=1000.0)
    assert float((flat(noisy) - flat(c)).abs().max()) > 10 * float((flat(a) - flat(c)).abs().max())


def _settings(**kw: object) -> RoundSettings:
    base = dict(run_id="r", server_round=1, num_rounds=1, task="breast-cancer", partition="iid", seed=0,
                local_epochs=2, lr=0.5, sample_rate=0.25, dp=True, noise_multiplier=1.0, max_grad_norm=1.0,
                target_epsilon=0.0, delta=1e-5, accountant="prv", grad_sample_mode="hooks")
    return RoundSettings(**{**base, **kw})  # type: ignore[arg-type]


def test_a_deployed_site_never_draws_dp_noise_from_the_seeded_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every generator the trainer makes is seeded identically here: a deployed site (no partition id) must still
    produce different noise each time (CSPRNG), a simulated client exactly the same update."""
    monkeypatch.setattr(trainer, "make_generator", lambda seed: make_generator(123))
    task, data = _breast_cancer(120)
    glob = {k: v.detach().clone() for k, v in task.new_model(0).state_dict().items()}
    outcomes = {}
    for kind, pid in (("deployed", None), ("simulated", 0)):
        runs = [train_round(Site("s", task, data, data, tmp_path / f"{kind}{i}", None, pid), _settings(), glob)
                for i in range(2)]
        outcomes[kind] = runs
    deployed, simulated = outcomes["deployed"], outcomes["simulated"]
    assert all(o.secure_noise for o in deployed) and not any(o.secure_noise for o in simulated)
    key = next(iter(glob))
    assert not torch.equal(deployed[0].state_dict[key], deployed[1].state_dict[key])
    assert torch.equal(simulated[0].state_dict[key], simulated[1].state_dict[key])
    # What leaves the site in clear under DP: the public weight and ledger figures, no count, no loss.
    for o in deployed:
        assert o.metrics[P.NUM_EXAMPLES] == P.PUBLIC_WEIGHT and P.TRAIN_LOSS not in o.metrics
        assert set(o.metrics) == {P.NUM_EXAMPLES, P.EPSILON, P.STEPS, P.ROUNDS_TRAINED, P.DELTA}
    plain = train_round(Site("s", task, data, data, tmp_path / "plain", None, None), _settings(dp=False), glob)
    assert plain.metrics[P.NUM_EXAMPLES] == len(data) and P.TRAIN_LOSS in plain.metrics  # --no-dp promises nothing
