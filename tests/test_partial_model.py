"""Partially trainable models travel partially: only trainable tensors go on the wire, are masked, aggregated and
checkpointed; the frozen rest is checked by the hash the server sends (a mismatch is a refusal naming it)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

import _sim_batch as sim_batch
from fedshield.client.round_work import CONFIG_ERROR_CODE, Refusal, run_train
from fedshield.config import RoundSettings, RunConfig
from fedshield.errors import ConfigError
from fedshield.tasks import get_task
from fedshield.tasks.partial import (
    FrozenWeightsMismatch, check_frozen, frozen_digest, load_travelling, travelling_keys, travelling_state,
)

# A `module:function` task whose convolution is frozen (a stand-in for a pretrained feature extractor): only the
# head's weight and bias (66 floats) are trainable.
USER_MODULE = textwrap.dedent(
    '''
    import numpy as np
    import torch
    from torch import nn
    from fedshield.dataspec import DataSpec, Dataset
    from fedshield.tasks import Task

    def _data():
        rng = np.random.default_rng(7)
        x = rng.normal(size=(300, 1, 4, 4)).astype(np.float32)
        y = (x[:, 0, :2, :].sum(axis=(1, 2)) > 0).astype(np.int64)
        return Dataset(x, y)

    def _model():
        features = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten())
        for p in features.parameters():
            p.requires_grad_(False)
        return nn.Sequential(features, nn.Linear(32, 2))

    def build_task():
        return Task(spec=DataSpec("frozen-4x4", (1, 4, 4), 2), build_model=_model, load_bundled=_data)
    '''
)


def _partial_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def test_partial_state_holds_only_trainable_tensors_and_the_hash_covers_the_rest() -> None:
    torch.manual_seed(0)
    model = _partial_model()
    assert travelling_keys(model) == ["1.weight", "1.bias", "2.weight", "2.bias"]
    digest = frozen_digest(model)
    assert len(digest) == 64
    check_frozen(model, digest, task="t")
    other = _partial_model()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other[0].weight[0, 0] += 1e-6  # one frozen value differs: the hash must differ
    with pytest.raises(FrozenWeightsMismatch, match=r"hash to .* server's hash is"):
        check_frozen(other, digest, task="t")
    # Loading travelling tensors leaves the frozen part alone; anything but the trainable keys is refused.
    load_travelling(other, travelling_state(model))
    assert torch.equal(other[2].weight, model[2].weight)
    with pytest.raises(ConfigError, match="missing"):
        load_travelling(other, model.state_dict() | {"x": torch.zeros(1)})


def test_a_full_model_travels_whole_with_no_hash() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert travelling_keys(model) == list(model.state_dict())
    assert frozen_digest(model) == ""


FROZEN_TASK = "fsbatch_frozen.mytask:build_task"
sim_batch.register(
    "partial_model", lambda root: RunConfig(task=FROZEN_TASK, num_clients=3, num_rounds=2, local_epochs=1,
                                            secagg=True, epsilon=8.0, out=root / "partial"),
    clients=3, files=sim_batch.task_package("fsbatch_frozen", USER_MODULE),
)  # in the shared simulation of the other 3-client tests (one Ray start)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> sim_batch.Batch:
    return sim_batch.results(tmp_path_factory, clients=3)


@sim_batch.TIMEOUT
def test_frozen_user_task_trains_with_secagg_and_only_the_head_travels(batch: sim_batch.Batch, tmp_path: Path) -> None:
    frozen_task = FROZEN_TASK
    config = batch.config("partial_model")
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_trained"] for r in rows] == [3, 3], rows
    # Only the head travels: 66 values, masked as 32-bit field elements, plus SecAgg+ framing (kilobytes, far
    # below what the frozen convolution would add if it travelled as well).
    assert all(r["bytes_up_per_client"] < 4096 for r in rows), rows
    saved = load_file(str(config.out / "model.safetensors"))
    assert sorted(saved) == ["1.bias", "1.weight"]
    model = get_task(frozen_task).new_model(config.seed)
    assert not torch.equal(torch.from_numpy(saved["1.weight"]), model[1].weight.detach())  # it trained
    privacy = json.loads((config.out / "privacy.json").read_text())
    assert 0 < privacy["guarantee"]["epsilon"] <= 8.0

    # A site whose frozen weights hash differently refuses before touching its data or its ledger.
    settings = RoundSettings(
        run_id="r", server_round=1, num_rounds=1, task=frozen_task, partition="iid", seed=config.seed,
        local_epochs=1, lr=0.1, sample_rate=0.5, dp=True, noise_multiplier=1.0, max_grad_norm=1.0,
        target_epsilon=0.0, delta=1e-5, accountant="prv", grad_sample_mode="hooks",
        sim_state_root=str(tmp_path / "ledgers"), frozen_digest="0" * 64,
    )
    arrays = {k: v.numpy() for k, v in travelling_state(model).items()}
    with pytest.raises(Refusal) as refused:
        run_train({"partition-id": 0, "num-partitions": 3}, settings.to_record_dict(), arrays)
    assert refused.value.code == CONFIG_ERROR_CODE
    assert "FrozenWeightsMismatch" in refused.value.reason and "0000000000000000" in refused.value.reason
    assert not (tmp_path / "ledgers").exists()


def test_secagg_field_fold_equals_the_sum_of_all_masked_vectors() -> None:
    """The server's running fold (one vector at a time) gives the very sum the listed vectors gave."""
    import numpy as np

    from fedshield.strategies._secagg_fold import FieldSum
    from fedshield.strategies._secagg_stages import masked_sum

    rng = np.random.default_rng(0)
    modulus = 2**32
    vectors = [[rng.integers(0, modulus, size=s, dtype=np.int64) for s in [(1,), (3, 4), ()]] for _ in range(7)]
    field = FieldSum(modulus)
    for vec in vectors:
        field.add(vec)
    for got, want in zip(field.value(), masked_sum(vectors, modulus), strict=True):
        assert got.shape == want.shape and np.array_equal(got, want)
    with pytest.raises(ValueError, match="no masked vectors"):
        FieldSum(modulus).value()
