"""The model a simulated client keeps between plain rounds (``fedshield.client.trainer``): its weights are loaded
and read through parameters looked up once, and a round trained on it is bit for bit the round a freshly built model
trains; a model with buffers is kept without that shortcut; and wrong weights are refused as before."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from fedshield.client import trainer
from fedshield.client.site import Site
from fedshield.config import RoundSettings
from fedshield.dataspec import Dataset
from fedshield.errors import ConfigError
from fedshield.tasks import get_task


def _site(tmp_path: Path, task: str = "digits") -> Site:
    t = get_task(task)
    data = t.load_bundled()
    subset = Dataset(data.x[:24], data.y[:24])
    return Site("client-0", t, subset, subset, tmp_path, None, 0)


def _settings(round_: int, **kw: Any) -> RoundSettings:
    base = dict(run_id="r", server_round=round_, num_rounds=3, task="digits", partition="iid", seed=0,
                local_epochs=1, lr=0.5, sample_rate=0.25, dp=False, noise_multiplier=0.0, max_grad_norm=1.0,
                target_epsilon=0.0, delta=1e-5, accountant="prv", grad_sample_mode="hooks")
    return RoundSettings(**{**base, **kw})


@pytest.fixture(autouse=True)
def no_kept_model() -> Any:
    trainer._SPARE.clear()
    yield
    trainer._SPARE.clear()


def _rounds(site: Site, *, keep: bool) -> list[dict[str, torch.Tensor]]:
    state = {k: v.detach().clone() for k, v in site.task.new_model(0).state_dict().items()}
    out = []
    for r in (1, 2, 3):
        if not keep:
            trainer._SPARE.clear()
        state = trainer.train_round(site, _settings(r), state).state_dict
        out.append(state)
    return out


def test_a_kept_model_trains_the_round_a_fresh_one_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = _site(tmp_path)
    loads: list[bool] = []
    load = trainer._load_kept

    def counted(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
        loads.append(load(model, state))
        return loads[-1]

    monkeypatch.setattr(trainer, "_load_kept", counted)
    kept = _rounds(site, keep=True)
    assert loads == [True, True]  # rounds 2 and 3 loaded into the kept model through its looked-up parameters
    model = next(iter(trainer._SPARE.values()))
    assert list(trainer._PARAMS[model]) == list(model.state_dict())
    loads.clear()
    fresh = _rounds(site, keep=False)
    assert loads == []  # built anew each round
    for a, b in zip(kept, fresh):
        assert list(a) == list(b) == list(site.task.new_model(0).state_dict())
        for key in a:
            assert torch.equal(a[key], b[key]) and a[key].is_contiguous()


def test_a_model_with_buffers_is_kept_without_the_lookup(tmp_path: Path) -> None:
    site = _site(tmp_path)
    model = nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
    trainer._spare(site, _settings(1), model)
    assert trainer._SPARE and model not in trainer._PARAMS  # a module may replace a buffer object
    assert set(trainer._cpu_state(model)) == set(model.state_dict())  # read through state_dict, buffers included


def test_wrong_weights_for_a_kept_model_are_refused_as_before(tmp_path: Path) -> None:
    site = _site(tmp_path)
    state = {k: v.detach().clone() for k, v in site.task.new_model(0).state_dict().items()}
    trainer.train_round(site, _settings(1), state)  # keeps the model
    missing = dict(list(state.items())[1:])
    with pytest.raises(ConfigError, match="missing"):
        trainer.train_round(site, _settings(2), missing)
    trainer.train_round(site, _settings(2), state)  # keeps one again
    key = next(iter(state))
    wrong = {**state, key: torch.zeros(3)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        trainer.train_round(site, _settings(3), wrong)


class _WithExtraState(nn.Linear):
    def get_extra_state(self) -> Any:
        return {"step": 1}

    def set_extra_state(self, state: Any) -> None:
        pass


@pytest.mark.parametrize("kind", ["tied", "extra-state", "load-hook"])
def test_a_model_whose_state_is_not_plain_parameters_is_kept_without_the_lookup(tmp_path: Path, kind: str) -> None:
    site = _site(tmp_path)
    if kind == "tied":
        model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        model[1].weight = model[0].weight  # one Parameter under two keys
    elif kind == "extra-state":
        model = nn.Sequential(_WithExtraState(4, 4))
    else:
        model = nn.Sequential(nn.Linear(4, 4))
        model.register_load_state_dict_post_hook(lambda module, keys: None)
    trainer._spare(site, _settings(1), model)
    assert trainer._SPARE and model not in trainer._PARAMS  # load_state_dict would do more than copy
