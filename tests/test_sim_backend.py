"""The local simulation backend (``--backend local``): Flower's real engine runs the real ClientApp on forked
worker processes instead of Ray actors.

One DP run through ``simulate()`` (the product path): the run directory, metrics and privacy report are those of a
Ray run (same schema, every epsilon recomputable). One run of a ClientApp that raises in one client and kills its
worker in another: both are reported as failed clients and the rounds go on. One CLI run SIGKILLed mid-run, together
with its reaper: the workers die by themselves (the kernel's parent-death signal). Nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from _multirun import run_many
from _processes import alive, long_simulation, still_alive_after
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedshield import protocol as P
from fedshield.client import app as fedshield_app
from fedshield.config import RoundSettings, RunConfig
from fedshield.deploy.process import live_descendants
from fedshield.errors import ConfigError
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedshield.server.report import recompute_epsilon
from fedshield.simulation.engine import choose_backend
from fedshield.simulation.run import simulate

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

#: The keys of a metrics.jsonl row (server/round_row.py: the server writes them, whatever backend ran the clients).
ROW_KEYS = {"accuracy", "bytes_up_per_client", "clients_evaluated", "clients_failed", "clients_refused",
            "clients_rejected", "clients_sampled", "clients_trained", "epsilon_max", "failed", "federated_accuracy",
            "federated_loss", "federated_round", "loss", "rejected", "round", "round_time_s", "wall_time_s"}


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_backend_choice_fails_clearly_on_what_only_ray_can_do() -> None:
    assert choose_backend(None) == "local"
    assert choose_backend(None, ray_address="auto") == "ray"
    assert choose_backend(None, gpus_per_client=0.5) == "ray"
    with pytest.raises(ConfigError, match="choose one of local, ray"):
        choose_backend("dask")
    with pytest.raises(ConfigError, match="drop one of the two"):
        choose_backend("local", ray_address="auto")
    with pytest.raises(ConfigError, match="--backend ray"):
        choose_backend("local", gpus_per_client=0.5)


def test_local_backend_runs_a_dp_simulation_with_the_same_reports(tmp_path: Path) -> None:
    config = RunConfig(num_clients=3, num_rounds=2, local_epochs=1, epsilon=8.0, secagg=False, seed=2,
                       out=tmp_path / "run")
    summary = simulate(config, backend="local")
    rows = _rows(config.out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(set(r) == ROW_KEYS for r in rows), rows
    assert all(r["clients_trained"] == 3 and r["clients_failed"] == 0 for r in rows), rows
    assert rows[-1]["accuracy"] > 0.3, rows[-1]  # learns (chance is 10%)
    privacy = json.loads((config.out / "privacy.json").read_text())
    assert privacy["dp"] is True and len(privacy["clients"]) == 3
    for c in privacy["clients"].values():
        assert c["rounds_trained"] == 2 and c["steps"] == 2 * config.steps_per_round
        assert c["epsilon"] == pytest.approx(recompute_epsilon(c), rel=1e-9)  # recomputable from what is beside it
        ledger = PrivacyLedger.load(config.out / "clients" / f"client-{c['partition_id']:04d}" / LEDGER_FILE)
        assert ledger.epsilon == pytest.approx(c["epsilon"], rel=1e-9)  # written by the worker, read here
        assert 0 < c["epsilon"] <= 8.0
    assert summary.rounds[-1]["accuracy"] == pytest.approx(rows[-1]["accuracy"])  # what the caller got is on disk


RAISES, DIES = 1, 2  # partitions: raise in round 1; kill its worker process in round 2

crashing_app = ClientApp()


@crashing_app.train(mods=[fedshield_app.packed_wire])
def _train(msg: Message, context: Context) -> Message:
    settings = RoundSettings.from_record_dict(dict(msg.content[P.CONFIG]))
    partition = int(context.node_config["partition-id"])
    if partition == RAISES and settings.server_round == 1:
        raise RuntimeError("deliberate failure in the ClientApp")
    if partition == DIES and settings.server_round == 2:
        os._exit(7)  # the worker process dies mid-message, as a native crash would
    return fedshield_app.train(msg, context)


@crashing_app.evaluate(mods=[fedshield_app.packed_wire])
def _evaluate(msg: Message, context: Context) -> Message:
    return fedshield_app.evaluate(msg, context)


def test_a_raising_client_and_a_dead_worker_are_failed_clients_and_the_run_goes_on(tmp_path: Path) -> None:
    config = RunConfig(num_clients=3, num_rounds=3, local_epochs=1, dp=False, secagg=False, seed=1,
                       out=tmp_path / "crash")
    run_many([config], client_app=crashing_app, backend="local")  # checks no process is left behind
    rows = _rows(config.out)
    assert [(r["clients_trained"], r["clients_failed"]) for r in rows] == [(2, 1), (2, 1), (3, 0)], rows
    assert "deliberate failure" in json.dumps(rows[0]["failed"]), rows[0]["failed"]
    assert "died" in json.dumps(rows[1]["failed"]), rows[1]["failed"]


def _workers_and_reaper(cli_pid: int) -> tuple[list[int], list[int]]:
    workers, reaper = [], []
    for pid in live_descendants(cli_pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        (reaper if "fedshield.simulation.reaper" in cmd else workers if "simulate" in cmd else []).append(pid)
    return workers, reaper


def test_sigkilled_simulation_takes_its_workers_with_it(tmp_path: Path) -> None:
    sim = long_simulation(tmp_path, "local")
    workers: list[int] = []
    try:
        sim.wait_for(r"round\s+1/40", timeout=240)
        workers, reaper = _workers_and_reaper(sim.proc.pid)
        assert len(workers) == 2 and len(reaper) == 1, (workers, reaper, sim.text())
        os.kill(reaper[0], signal.SIGKILL)  # no clean-up helper: the workers must follow by themselves
        os.kill(sim.proc.pid, signal.SIGKILL)
        sim.proc.wait(timeout=30)
        left = still_alive_after(workers, 30, poll=0.1)
        assert not left, f"local workers outlived the SIGKILLed simulation: {left}"
    finally:
        if sim.proc.poll() is None:
            sim.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_round_is_recorded_behind_the_next_and_its_failure_ends_the_run(tmp_path: Path) -> None:
    """The server-side test and the report run on one background thread while the next round trains
    (server/runner.py:_AfterRound): the callback sees every round in order, from that thread; a record that fails
    (here: the callback) ends the run with its own error, and the rounds recorded before it stay resumable."""
    import threading

    seen: list[tuple[int, str]] = []

    def on_round(record: Any) -> None:
        seen.append((record.server_round, threading.current_thread().name))
        if record.server_round == 2:
            raise OSError("deliberate: the disk is full")

    config = RunConfig(num_clients=2, num_rounds=4, local_epochs=1, dp=False, secagg=False, seed=3,
                       out=tmp_path / "run")
    with pytest.raises(OSError, match="deliberate"):
        simulate(config, backend="local", on_round=on_round)
    assert [r for r, _ in seen] == [1, 2], seen
    assert all(name.startswith("fedshield-after-round") for _, name in seen), seen
    rows = _rows(config.out)
    assert [r["round"] for r in rows] == [1, 2]  # round 2's files were written before its callback raised
    from fedshield.server.checkpoint import load_checkpoint

    assert load_checkpoint(config.out).server_round == 2

