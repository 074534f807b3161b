"""SecAgg+ through Flower's real simulation engine (Ray): fedshield's SecAggPlus strategy inside RecordingStrategy,
fedshield's port of ``secaggplus_mod`` on the clients; every run in one simulation, with hygiene checks on what it
leaves behind. The harness and its reference are in ``_secagg_harness.py``."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedshield.protocol import BUDGET_REFUSAL, EPSILON
from fedshield.strategies.outcomes import RoundOutcomes
from fedshield.strategies.recording import RecordingStrategy
from fedshield.strategies.secagg import SecAggPlus

from _secagg_harness import (
    MAX_WEIGHT,
    as_numpy,
    assert_weighted_average,
    field,
    initial_arrays,
    make_client_app,
    ok_partitions,
)


# --- the real simulation engine -------------------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _zombie_free(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


#: The simulated runs of this module, all in ONE simulation (one Ray start): ``name -> (rounds, train config)``.
#: ``refusing`` names the partition that refuses to train; ``quantize`` is what the server asks for.
SIM_RUNS: dict[str, tuple[int, dict[str, int]]] = {
    "three_rounds": (3, {"quantize": 0}),
    "refusing": (2, {"quantize": 0, "refusing": 0}),
    "q8": (2, {"quantize": 8}),
    "q16": (2, {"quantize": 16}),
}
SIM_NODES = 5


def _run_strategy(grid: Grid, num_rounds: int, train_config: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"models": [], "replies": [], "bytes_up": []}
    # min_train_nodes too: the ServerApp thread starts before the simulation registers its nodes, and FedAvg sizes
    # its sample from the nodes registered at that moment.
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=SIM_NODES, min_available_nodes=SIM_NODES)
    # Inside RecordingStrategy, as fedshield's server runs it: bytes_up is its metric.
    outcomes = RoundOutcomes()
    strategy = RecordingStrategy(SecAggPlus(inner, max_weight=MAX_WEIGHT, timeout=120, outcomes=outcomes), outcomes)

    def record(rnd: int, arrays: ArrayRecord) -> None:
        out["models"].append(as_numpy(arrays))
        if rnd:
            out["replies"].append(list(strategy.last_replies))
            out["bytes_up"].append(list(strategy.last_bytes_up))

    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=num_rounds, evaluate_fn=record,
                   timeout=120, train_config=ConfigRecord(train_config))
    return out


@pytest.fixture(scope="module")
def simulated() -> dict[str, dict[str, Any]]:
    """Every run of :data:`SIM_RUNS` in one simulation; fail if Ray processes, sessions or files outlive it."""
    import ray
    from flwr.simulation import run_simulation
    from flwr.supercore import telemetry

    before = _descendants(os.getpid())
    home = tempfile.mkdtemp(prefix="fs-flwr-home-")
    results: dict[str, dict[str, Any]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_HOME", home)
        mp.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")  # read at import; offline machines hang on it
        for key in ("source", "cluster", "partner"):  # or the telemetry thread writes FLWR_HOME/source
            mp.setitem(telemetry.state, key, "test")
        # RayBackend writes the driver's sys.path into PYTHONPATH; restored when the context exits.
        mp.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            for name, (rounds, train_config) in SIM_RUNS.items():
                results[name] = _run_strategy(grid, rounds, train_config)

        ray_tmp = tempfile.mkdtemp(prefix="fsray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        try:
            run_simulation(
                server_app=app, client_app=make_client_app(), num_supernodes=SIM_NODES,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"_temp_dir": ray_tmp, "include_dashboard": False, "num_cpus": 2},
                },
            )
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not ray.is_initialized(), "run_simulation must shut Ray down"
    deadline = time.monotonic() + 20
    while (left := _zombie_free(_descendants(os.getpid()) - before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    shutil.rmtree(home, ignore_errors=True)
    assert not left, f"simulation left processes behind: {sorted(left)}"
    assert set(results) == set(SIM_RUNS), f"runs that did not finish: {set(SIM_RUNS) - set(results)}"
    return results


@pytest.fixture(scope="module")
def three_rounds(simulated: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return simulated["three_rounds"]


def test_simulation_aggregate_equals_fedavg_of_the_same_updates(three_rounds: dict[str, Any]) -> None:
    models, replies = three_rounds["models"], three_rounds["replies"]
    assert ok_partitions(replies[0]) == [0, 1, 2, 3, 4]
    assert_weighted_average(models[0], models[1], [0, 1, 2, 3, 4], 1)


def test_simulation_runs_several_rounds(three_rounds: dict[str, Any]) -> None:
    models, replies = three_rounds["models"], three_rounds["replies"]
    assert len(models) == 4 and len(replies) == 3
    for rnd in (2, 3):
        assert ok_partitions(replies[rnd - 1]) == [0, 1, 2, 3, 4]
        assert_weighted_average(models[rnd - 1], models[rnd], [0, 1, 2, 3, 4], rnd)
        assert {r.metrics[EPSILON] for r in replies[rnd - 1]} == {0.5 * rnd}


def test_simulation_refusing_client_is_dropped_with_its_reason(simulated: dict[str, dict[str, Any]]) -> None:
    out = simulated["refusing"]
    for rnd in (1, 2):
        replies = out["replies"][rnd - 1]
        (refused,) = [r for r in replies if not r.ok]
        assert refused.error is not None and f"{BUDGET_REFUSAL} test" in refused.error
        assert ok_partitions(replies) == [1, 2, 3, 4]
        assert_weighted_average(out["models"][rnd - 1], out["models"][rnd], [1, 2, 3, 4], rnd)


@pytest.fixture(scope="module")
def quantized_runs(simulated: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {bits: simulated[f"q{bits}"] for bits in (8, 16)}


@pytest.mark.parametrize("bits", [8, 16])
def test_simulation_quantized_aggregate_is_fedavg_within_the_field_bound(
    quantized_runs: dict[int, dict[str, Any]], bits: int
) -> None:
    out, (clip, levels) = quantized_runs[bits], field(bits, 5)
    for rnd in (1, 2):
        assert ok_partitions(out["replies"][rnd - 1]) == [0, 1, 2, 3, 4]
        assert_weighted_average(out["models"][rnd - 1], out["models"][rnd], [0, 1, 2, 3, 4], rnd,
                                clip=clip, levels=levels)


def test_simulation_eight_bit_bytes_per_client_at_most_0_55x_full_precision(
    quantized_runs: dict[int, dict[str, Any]], three_rounds: dict[str, Any]
) -> None:
    full = [b for rnd in three_rounds["bytes_up"] for b in rnd]
    for bits, limit in ((8, 0.55), (16, 1.0)):
        sent = [b for rnd in quantized_runs[bits]["bytes_up"] for b in rnd]
        assert len(sent) == 10 and max(sent) <= limit * min(full), (bits, sent, full)
