"""``tests/_sim_batch.py``: a run of the shared simulation that fails fails only the tests that read it, the runs
after it still run, and a run whose set-up fails is left out instead of stopping the batch."""

from __future__ import annotations

import json

import pytest

import _sim_batch as sim_batch
from fedshield.config import RunConfig
from fedshield.errors import ConfigError

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("no_leftover_processes"), sim_batch.TIMEOUT]

# Fails in run_server at start-up (build_strategy checks the strategy's settings), before any round.
sim_batch.register("sim_batch/refused", lambda root: RunConfig(
    num_clients=3, num_rounds=1, strategy="fedprox", strategy_params={"mu": 0.1}, out=root / "sim_batch-refused",
), clients=3)
# Fails while the batch is set up (RunConfig refuses 0 rounds): left out of the simulation.
sim_batch.register("sim_batch/unbuilt", lambda root: RunConfig(num_clients=3, num_rounds=0, out=root / "x"), clients=3)
sim_batch.register("sim_batch/after", lambda root: RunConfig(
    num_clients=3, num_rounds=1, local_epochs=1, dp=False, secagg=False, out=root / "sim_batch-after",
), clients=3)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> sim_batch.Batch:
    return sim_batch.results(tmp_path_factory, clients=3)


def test_a_failing_run_fails_only_its_readers_and_the_batch_goes_on(batch: sim_batch.Batch) -> None:
    with pytest.raises(RuntimeError, match="'sim_batch/refused'") as failed:
        batch.config("sim_batch/refused")
    assert isinstance(failed.value.__cause__, ConfigError)
    assert "strategy 'fedprox' has no setting 'mu'" in str(failed.value.__cause__)
    with pytest.raises(RuntimeError, match="'sim_batch/unbuilt'") as unbuilt:
        batch.config("sim_batch/unbuilt")
    assert "rounds must be a whole number >= 1, got 0" in str(unbuilt.value.__cause__)
    after = batch.config("sim_batch/after")
    rows = [json.loads(line) for line in (after.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_trained"] for r in rows] == [3], rows
    assert set(batch.view("sim_batch/")) == {"refused", "unbuilt", "after"}
