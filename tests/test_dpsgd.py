"""DP-SGD invariants, checked on the real Opacus code path that clients run (fedshield.privacy.dpsgd)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fedshield.dataspec import Dataset
from fedshield.errors import PrivacyError
from fedshield.privacy.dpsgd import train_dp_sgd
from fedshield.training import LocalTrainResult, evaluate, make_generator, train_plain
from fedshield.tasks import get_task


def _data(n: int = 64, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(np.int64)
    return Dataset(x, y)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _dp(model: nn.Module, data: Dataset, *, sigma: float, clip: float, q: float = 1.0, epochs: int = 1, lr: float = 1.0,
        seed: int = 0, mode: str = "hooks") -> LocalTrainResult:
    return train_dp_sgd(model, data, noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q, epochs=epochs, lr=lr,
                        loss_fn=nn.CrossEntropyLoss(), generator=make_generator(seed), grad_sample_mode=mode)


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_no_noise_and_no_clipping_equals_plain_training(mode: str) -> None:
    data = _data()
    private, plain = _model(), _model()
    # q = 1 includes every example in every step, so both runs see the same full batches.
    _dp(private, data, sigma=0.0, clip=1e6, q=1.0, epochs=3, mode=mode)
    train_plain(plain, data, sample_rate=1.0, epochs=3, lr=1.0, loss_fn=nn.CrossEntropyLoss(), generator=make_generator(0))
    assert torch.allclose(_flat(private), _flat(plain), atol=1e-6)


@pytest.mark.parametrize("mu", [0.0, 0.3])
def test_plain_sgd_is_torch_sgd_bit_for_bit_and_imports_no_dynamo(mu: float) -> None:
    """PlainSGD (train_plain's optimizer) makes exactly torch.optim.SGD's updates, FedProx's term included; and a
    fresh process trains with it without importing torch._dynamo (1.5-2 s of CPU that torch's SGD.step costs)."""
    import subprocess
    import sys

    from fedshield.training import ProximalTerm, run_epochs

    data = _data()
    ours, theirs = _model(), _model()
    for model, optimizer_class in ((ours, None), (theirs, torch.optim.SGD)):
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(data.x),
                                             torch.from_numpy(data.y)), batch_size=16, shuffle=True,
                                             generator=make_generator(3))
        proximal = ProximalTerm.for_model(model, mu=mu, lr=0.5)
        if optimizer_class is None:
            train_plain(model, data, sample_rate=0.25, epochs=2, lr=0.5, loss_fn=nn.CrossEntropyLoss(),
                        generator=make_generator(3), proximal_mu=mu)
        else:
            run_epochs(model, optimizer_class(model.parameters(), lr=0.5), nn.CrossEntropyLoss(), loader, 2, proximal,
                       device=torch.device("cpu"))
    assert torch.equal(_flat(ours), _flat(theirs))
    code = ("import sys, numpy as np, torch\n"
            "from torch import nn\n"
            "from fedshield.dataspec import Dataset\n"
            "from fedshield.training import make_generator, train_plain\n"
            "x = np.random.default_rng(0).normal(size=(32, 6)).astype(np.float32)\n"
            "train_plain(nn.Linear(6, 2), Dataset(x, (x[:, 0] > 0).astype(np.int64)), sample_rate=0.5, epochs=1,"
            " lr=0.5, loss_fn=nn.CrossEntropyLoss(), generator=make_generator(0))\n"
            "print('torch._dynamo' in sys.modules)\n")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip() == "False"


def test_clipped_per_sample_update_has_the_bound_as_norm() -> None:
    # One example, q = 1, no noise, lr = 1: the parameter change IS the clipped per-sample gradient (mean over 1).
    data = _data(n=1)
    for clip in (1e-3, 0.05):
        model = _model()
        before = _flat(model)
        _dp(model, data, sigma=0.0, clip=clip)
        assert float((_flat(model) - before).norm()) == pytest.approx(clip, rel=1e-4)
    # A bound larger than the gradient leaves it untouched: the change equals the plain gradient step.
    model, plain = _model(), _model()
    _dp(model, data, sigma=0.0, clip=1e6)
    train_plain(plain, data, sample_rate=1.0, epochs=1, lr=1.0, loss_fn=nn.CrossEntropyLoss(), generator=make_generator(0))
    assert torch.allclose(_flat(model), _flat(plain), atol=1e-7)


def test_added_noise_has_variance_sigma_squared_c_squared() -> None:
    data = _data(n=32)
    sigma, clip, n = 0.7, 0.5, 32
    clean, noisy = _model(), _model()
    _dp(clean, data, sigma=0.0, clip=clip, seed=1)
    _dp(noisy, data, sigma=sigma, clip=clip, seed=1)
    # Opacus: step = -lr * (sum of clipped grads + N(0, sigma^2 C^2)) / expected_batch_size, with q = 1 -> n.
    noise = (_flat(clean) - _flat(noisy)) * n
    d = noise.numel()
    var = float(noise.var())
    # The sample variance of d Gaussians has relative std sqrt(2/(d-1)); allow 5 of those.
    tol = 5 * np.sqrt(2 / (d - 1))
    assert abs(var / (sigma * clip) ** 2 - 1) < tol, (var, (sigma * clip) ** 2, d)
    assert abs(float(noise.mean())) < 5 * sigma * clip / np.sqrt(d)


def test_history_records_exactly_the_mechanism_run() -> None:
    result = _dp(_model(), _data(), sigma=1.3, clip=1.0, q=0.25, epochs=2)
    assert result.history == ((1.3, 0.25, 8),)
    assert result.steps == 8


def test_empty_data_is_refused() -> None:
    with pytest.raises(PrivacyError, match="empty"):
        _dp(_model(), Dataset(np.zeros((0, 6), np.float32), np.zeros((0,), np.int64)), sigma=1.0, clip=1.0)


def test_digits_model_learns_with_dp_but_not_with_absurd_noise() -> None:
    task = get_task("digits")
    data = task.load_bundled()
    train, test = data.subset(np.arange(0, 1400)), data.subset(np.arange(1400, len(data)))
    good, drowned = task.new_model(0), task.new_model(0)
    _dp(good, train, sigma=1.0, clip=1.0, q=0.25, epochs=15, lr=2.0, mode="ghost")
    _dp(drowned, train, sigma=1000.0, clip=1.0, q=0.25, epochs=15, lr=2.0, mode="ghost")
    acc_good = evaluate(good, test, nn.CrossEntropyLoss())[1]
    acc_drowned = evaluate(drowned, test, nn.CrossEntropyLoss())[1]
    assert acc_good > 0.8, acc_good
    assert acc_drowned < 0.3, acc_drowned


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_empty_poisson_batches_are_counted_steps(mode: str) -> None:
    # 3 examples at q = 1/8: most batches are empty; each is still a step of the mechanism, noise included.
    data = _data(n=3)
    model = _model()
    before = _flat(model)
    result = _dp(model, data, sigma=1.0, clip=1.0, q=0.125, epochs=2, mode=mode)
    assert result.history == ((1.0, 0.125, 16),)
    # 3 x 1/8 < 1 expected examples per batch: Opacus's int() batch size would be 0 and the weights inf/NaN.
    assert torch.isfinite(_flat(model)).all() and math.isfinite(result.mean_loss)
    assert not torch.allclose(_flat(model), before)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch", "ew"])
@pytest.mark.parametrize(("n", "q"), [(64, 0.5), (3, 0.125)])  # ~32-example batches; mostly empty batches
def test_physical_batch_cap_splits_passes_not_steps(mode: str, n: int, q: float) -> None:
    """Opacus BatchMemoryManager: passes of at most 5 examples, one noisy step per Poisson batch. Same generator,
    so the same batches and noise: the parameters equal the unsplit run's (summation order aside) and the
    accountant records the same logical steps."""
    if mode == "ew" and n == 3:
        pytest.skip("Opacus's ew mode cannot run an empty batch at all ('Batch size must be positive')")
    runs = []
    for cap in (0, 5):
        model = _model()
        result = train_dp_sgd(model, _data(n=n), noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q, epochs=2,
                              lr=1.0, loss_fn=nn.CrossEntropyLoss(), generator=make_generator(3),
                              grad_sample_mode=mode, proximal_mu=0.1, max_physical_batch_size=cap)
        runs.append((_flat(model), result))
    (whole, unsplit), (split, capped) = runs
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    assert capped.history == unsplit.history == ((1.0, q, 2 * round(1 / q)),)
    assert capped.steps == unsplit.steps
    if not math.isnan(unsplit.mean_loss):
        assert capped.mean_loss == pytest.approx(unsplit.mean_loss, rel=1e-5)


@pytest.mark.parametrize("n,batch,epochs", [(11, 6, 1), (12, 6, 2), (1, 1, 3), (40, 16, 2)])
def test_shuffled_batches_are_the_data_loaders_batches_and_draws(n: int, batch: int, epochs: int) -> None:
    """train_plain's ShuffledBatches yields the DataLoader's batches and leaves the generator where it leaves it,
    so what draws from it next (client-level DP noise, quantization) is unchanged."""
    from fedshield.training import ShuffledBatches

    rng = np.random.default_rng(n)
    data = Dataset(rng.normal(size=(n, 3)).astype(np.float32), rng.integers(0, 4, size=n).astype(np.int64))
    ours, theirs = make_generator(7), make_generator(7)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.from_numpy(data.x),
                                         torch.from_numpy(data.y)), batch_size=batch, shuffle=True, generator=theirs)
    batches = ShuffledBatches(data, batch_size=batch, generator=ours)
    assert len(batches) == len(loader)
    for _ in range(epochs):
        got, want = list(batches), list(loader)
        assert len(got) == len(want)
        for (x, y), (x2, y2) in zip(got, want):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(torch.randint(0, 2**62, (4,), generator=ours), torch.randint(0, 2**62, (4,), generator=theirs))


def test_plain_training_refuses_an_empty_client() -> None:
    from fedshield.errors import DataError

    with pytest.raises(DataError, match="no training records"):
        train_plain(_model(), Dataset(np.zeros((0, 6), np.float32), np.zeros((0,), np.int64)), sample_rate=0.5,
                    epochs=1, lr=0.1, loss_fn=nn.CrossEntropyLoss(), generator=make_generator(0))


def test_a_reused_model_trains_and_evaluates_as_a_fresh_one(tmp_path: Path) -> None:
    """A plain round or an evaluation reuses the process's model of the task (client/trainer.py:_spare): rounds
    run in any order on it give bit for bit what each gives on a freshly built model; a DP-SGD round never
    leaves its model to be reused."""
    import dataclasses

    from fedshield.client import trainer
    from fedshield.client.trainer import evaluate_round, train_round
    from fedshield.config import RoundSettings

    site, glob = _one_site("breast-cancer", 120, tmp_path)
    base = dict(run_id="r", server_round=1, num_rounds=1, task="breast-cancer", partition="iid", seed=0,
                local_epochs=2, lr=0.5, sample_rate=0.25, dp=True, noise_multiplier=1.0, max_grad_norm=1.0,
                target_epsilon=0.0, delta=1e-5, accountant="prv", grad_sample_mode="hooks")
    other = {k: v + 0.01 for k, v in glob.items()}
    plain, private = RoundSettings(**{**base, "dp": False}), RoundSettings(**base)

    def fresh(settings: Any, state: dict[str, torch.Tensor]) -> Any:
        trainer._SPARE.clear()  # pylint: disable=protected-access
        trained = train_round(site, settings, state).state_dict
        trainer._SPARE.clear()  # pylint: disable=protected-access
        return trained, evaluate_round(site, settings, state)

    rounds = ((plain, glob), (dataclasses.replace(plain, server_round=2), other))
    want = [fresh(settings, state) for settings, state in rounds]
    trainer._SPARE.clear()  # pylint: disable=protected-access
    got = []
    for settings, state in rounds:
        got.append((train_round(site, settings, state).state_dict, evaluate_round(site, settings, state)))
        assert len(trainer._SPARE) == 1  # pylint: disable=protected-access
    for (state_a, eval_a), (state_b, eval_b) in zip(got, want):
        assert eval_a == eval_b
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_b)
    trainer._SPARE.clear()  # pylint: disable=protected-access
    train_round(site, private, glob)  # DP-SGD
    assert not trainer._SPARE  # pylint: disable=protected-access


def test_a_channels_last_task_trains_plain_rounds_in_that_format_and_sends_contiguous_weights(tmp_path: Path) -> None:
    """Digits opts into channels-last (``Task.channels_last``): a plain round trains the model in that format and
    gives, up to float rounding, what the default format gives; the weights it sends are contiguous; a DP-SGD
    round keeps the default format (Opacus)."""
    from fedshield.client import trainer
    from fedshield.config import RoundSettings
    from fedshield.tasks.partial import load_travelling

    site, glob = _one_site("digits", 40, tmp_path)
    task, subset = site.task, site.train
    settings = RoundSettings(run_id="r", server_round=1, num_rounds=1, task="digits", partition="iid", seed=0,
                             local_epochs=1, lr=0.5, sample_rate=0.25, dp=False, noise_multiplier=1.0,
                             max_grad_norm=1.0, target_epsilon=0.0, delta=1e-5, accountant="prv",
                             grad_sample_mode="hooks")
    trainer._SPARE.clear()  # pylint: disable=protected-access
    sent = trainer.train_round(site, settings, glob).state_dict
    (kept,) = trainer._SPARE.values()  # pylint: disable=protected-access
    trainer._SPARE.clear()  # pylint: disable=protected-access
    assert kept.features[3].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(v.is_contiguous() for v in sent.values())
    default = task.new_model(0)
    load_travelling(default, glob)
    train_plain(default, subset, sample_rate=0.25, epochs=1, lr=0.5, loss_fn=task.loss_fn(),
                generator=trainer._generator(site, settings))  # pylint: disable=protected-access
    for key, value in default.state_dict().items():
        assert torch.allclose(sent[key], value, atol=1e-5), key
    assert not trainer._model(site, settings, glob).features[3].weight.is_contiguous(  # pylint: disable=protected-access
        memory_format=torch.channels_last)  # what a DP-SGD round builds


def _one_site(task_name: str, rows: int, tmp_path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """A CPU site holding the task's first ``rows`` bundled records (to train and test on), and the task's initial
    weights as a round's global state."""
    from fedshield.client.site import Site

    task = get_task(task_name)
    data = task.load_bundled()
    subset = Dataset(data.x[:rows], data.y[:rows])
    site = Site("client-0", task, subset, subset, tmp_path, None, 0, torch.device("cpu"))
    return site, {k: v.detach().clone() for k, v in task.new_model(0).state_dict().items()}
