"""A user's own task, loaded from ``package.module:factory``, checked by Opacus' validator and trained end to end
through the real simulation engine."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import _sim_batch as sim_batch
from fedshield.config import RunConfig
from fedshield.errors import ConfigError
from fedshield.tasks import get_task

USER_MODULE = textwrap.dedent(
    '''
    import numpy as np
    from torch import nn
    from fedshield.dataspec import DataSpec, Dataset
    from fedshield.tasks import Task

    def _data():
        rng = np.random.default_rng(7)
        x = rng.normal(size=(600, 1, 4, 4)).astype(np.float32)
        y = (x[:, 0, :2, :].sum(axis=(1, 2)) > 0).astype(np.int64)
        return Dataset(x, y)

    def build_task():
        # BatchNorm on purpose: fedshield must swap it for GroupNorm, with a warning.
        return Task(
            spec=DataSpec("synthetic-4x4", (1, 4, 4), 2),
            build_model=lambda: nn.Sequential(
                nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Tanh(), nn.Flatten(), nn.Linear(128, 2)
            ),
            load_bundled=_data,
        )

    def build_lstm_task():
        return Task(spec=DataSpec("lstm", (4, 3), 2), build_model=lambda: nn.LSTM(3, 4))

    def not_a_task():
        return 42
    '''
)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mytask.py").write_text(USER_MODULE)
    # PYTHONPATH reaches the Ray workers that run the virtual clients; sys.path serves this process.
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg.mytask"
    get_task.cache_clear()
    for name in [m for m in sys.modules if m.startswith("userpkg")]:
        del sys.modules[name]


USER_TASK = "fsbatch_user.mytask:build_task"
sim_batch.register(
    "user_task", lambda root: RunConfig(task=USER_TASK, num_clients=3, num_rounds=2, local_epochs=3, secagg=False,
                                        epsilon=8.0, out=root / "user"),
    clients=3, files=sim_batch.task_package("fsbatch_user", USER_MODULE),
)  # in the shared simulation of the other 3-client tests (one Ray start)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> sim_batch.Batch:
    return sim_batch.results(tmp_path_factory, clients=3)


@sim_batch.TIMEOUT
def test_user_task_trains_end_to_end(batch: sim_batch.Batch, caplog: pytest.LogCaptureFixture) -> None:
    config = batch.config("user_task")
    get_task.cache_clear()  # the batch loaded the task already: load it again to see the fix and its warning
    task = get_task(USER_TASK)
    assert "GroupNorm" in str(task.new_model(0)) and "BatchNorm" not in str(task.new_model(0))
    assert "BatchNorm" in caplog.text
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_trained"] for r in rows] == [3, 3]
    assert rows[-1]["accuracy"] > 0.7, rows  # a linearly separable problem: clearly above chance (0.5)
    privacy = json.loads((config.out / "privacy.json").read_text())
    assert 7.5 < privacy["guarantee"]["epsilon"] <= 8.0


def test_user_task_fixes_and_errors_name_the_problem(user_module: str) -> None:
    assert "DPLSTM" in str(get_task(f"{user_module}:build_lstm_task").new_model(0))
    with pytest.raises(ConfigError, match="returned int, expected fedshield Task"):
        get_task(f"{user_module}:not_a_task")
    with pytest.raises(ConfigError, match="has no callable 'nope'"):
        get_task(f"{user_module}:nope")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg.x'"):
        get_task("no_such_pkg.x:build")


@pytest.mark.parametrize("name", ["digits", "breast-cancer"])
def test_new_model_is_the_torch_manual_seed_model_and_leaves_the_global_rng_alone(name: str) -> None:
    """new_model seeds only the CPU generator (the fast path): the weights are exactly those torch.manual_seed gives,
    and the caller's random state is untouched."""
    import torch

    task = get_task(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        expected = task.build_model().state_dict()
    before = torch.random.get_rng_state()
    got = task.new_model(11).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in got)
    assert not all(torch.equal(a, b) for a, b in zip(got.values(), task.new_model(12).state_dict().values()))


def test_the_server_tests_a_channels_last_task_on_a_copy_and_gets_the_models_own_figures() -> None:
    """The digits task opts into a channels-last test copy (``Task.channels_last``): over a round's weights it
    gives the loss and accuracy the model itself gives, and the model whose weights travel keeps its format."""
    from fedshield.client.site import bundled_split
    from fedshield.server.runner import _test_copy
    from fedshield.tasks.partial import load_travelling, travelling_state
    from fedshield.training import evaluate

    task = get_task("digits")
    assert task.channels_last and not get_task("breast-cancer").channels_last
    model = task.new_model(0)
    copy = _test_copy(task, model)
    trained = task.new_model(7)  # another round's weights
    load_travelling(copy, travelling_state(trained))
    test = bundled_split("digits", "iid", 10, 0).server_test
    loss, acc = evaluate(copy, test, task.loss_fn())
    want_loss, want_acc = evaluate(trained, test, task.loss_fn())
    assert acc == want_acc and loss == pytest.approx(want_loss, rel=1e-6)
    assert copy.features[3].weight.is_contiguous(memory_format=torch.channels_last)  # 16 input channels: unambiguous
    assert all(t.is_contiguous() for t in travelling_state(model).values())
    assert all(torch.equal(a, b) for a, b in zip(travelling_state(model).values(),
                                                   travelling_state(task.new_model(0)).values()))


@pytest.mark.parametrize("task", ["digits", "breast-cancer"])
def test_the_servers_test_uses_the_copy_only_for_a_channels_last_task(task: str) -> None:
    from fedshield.server.plan import plan_run
    from fedshield.server.runner import _AfterRound

    config = RunConfig(task=task, num_clients=4, num_rounds=1, dp=False)
    model = get_task(task).new_model(0)
    after_round = _AfterRound(plan_run(config), model, None, None, None)  # type: ignore[arg-type]
    try:
        assert (after_round.model is model) == (task == "breast-cancer")
        assert after_round._test({k: v.clone() for k, v in model.state_dict().items()})["accuracy"] >= 0.0
    finally:
        after_round.close()


def test_a_task_whose_model_cannot_take_channels_last_fails_in_one_line_naming_the_fix() -> None:
    from torch import nn

    from fedshield.dataspec import DataSpec
    from fedshield.tasks import Task

    task = Task(spec=DataSpec("volumes", (1, 4, 4, 4), 2), build_model=lambda: nn.Conv3d(1, 2, 3),
                channels_last=True)
    with pytest.raises(ConfigError, match="channels_last=True .* build the task with channels_last=False"):
        task.in_channels_last(task.new_model(0))
