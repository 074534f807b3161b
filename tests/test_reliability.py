"""Reliability under faults: each scenario of docs/RELIABILITY.md, asserting what survives and what is reported.

* (c) malicious client, (e) slow client: on Flower's simulation engine (one Ray start for all their runs), with
  a test-only ClientApp that wraps fedshield's own handlers (``_faulty_clients.py``), so the server side is
  exactly the one a deployment runs (``run_server``: update validation, SecAgg+, the round timeout); no fault
  injector ships in the package.
* (b) server SIGKILLed mid-round and restarted with ``--resume``: real ``python -m fedshield server`` and
  ``client`` processes on 127.0.0.1, TLS and node keys, SecAgg+ and DP-SGD.
* (a) 20 real clients, 30% of them SIGKILLed mid-round, rejoining later: ``@pytest.mark.slow`` (run with
  ``pytest -m slow tests/test_reliability.py``).
* (d) a client SIGKILLed while writing its ledger: ``tests/test_ledger_crash.py``.

Every test prints its figure (``FIGURE ...``: load held, faults survived, inputs tried, data lost, wall time); run
with ``-s`` to see them.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _multirun import run_many
from _processes import Cli, digits_sites
from safetensors.numpy import load_file

from fedshield.config import RunConfig
from fedshield.crypto import init_keys
from fedshield.deploy import free_port
from fedshield.errors import ConfigError
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedshield.server.checkpoint import load_checkpoint
from fedshield.server.report import recompute_epsilon

from _faulty_clients import (
    ATTACKS,
    CLIENTS,
    MAX_UPDATE_NORM,
    ROUNDS,
    ROUND_TIMEOUT,
    SLOW,
    SLOW_EXTRA_S,
    SLOW_ROUNDS,
    sim_config,
    attack_for,
    faulty_app,
)

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _figure(scenario: str, **figures: object) -> None:
    print(f"\nFIGURE {scenario}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _node_to_partition(out: Path) -> dict[int, int]:
    clients = json.loads((out / "privacy.json").read_text())["clients"]
    return {int(c["node_id"]): int(c["partition_id"]) for c in clients.values() if c["partition_id"] is not None}


# ------------------------------------------------------------------------------------------------ the round timeout


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), True])
def test_the_round_timeout_is_a_finite_number_of_seconds(bad: float) -> None:
    with pytest.raises(ConfigError, match="round-timeout must be"):
        RunConfig(round_timeout=bad)


def test_the_round_timeout_reaches_flower_secagg_and_the_command_lines() -> None:
    from typer.testing import CliRunner

    from fedshield.cli import cli
    from fedshield.deploy.coordinator import flower_run_config
    from fedshield.strategies.secagg import SecAggPlus
    from fedshield.strategies.stack import build_strategy

    config = RunConfig(round_timeout=42.0)
    assert flower_run_config(config)["round-timeout"] == 42.0
    assert RunConfig.from_mapping({"round-timeout": 42}, zero_is_unset=True) == config
    (node,) = [layer for layer in build_strategy(config).layers if isinstance(layer, SecAggPlus)]
    assert node.timeout == 42.0  # SETUP, SHARE_KEYS and UNMASK; the train stage gets it from Strategy.start
    runner = CliRunner()
    for command in (["simulate"], ["server", "--insecure", "--address", "127.0.0.1:0"]):
        result = runner.invoke(cli, [*command, "--round-timeout", "0"])
        assert result.exit_code == 2 and "round-timeout must be" in result.output, result.output


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four runs in one simulation: a clean control, the malicious run, and the slow client with and without
    SecAgg+. The clean run goes first, so Ray's actors are warm before a run with a short round timeout; the
    SecAgg+ run comes before the plain one, so no late plain reply overwrites a node's SecAgg+ state."""
    root = tmp_path_factory.mktemp("faults")
    configs = [
        sim_config(root / "clean", max_update_norm=MAX_UPDATE_NORM),
        sim_config(root / "malicious", max_update_norm=MAX_UPDATE_NORM),
        sim_config(root / "slow-secagg", round_timeout=ROUND_TIMEOUT, secagg=True),
        sim_config(root / "slow-plain", round_timeout=ROUND_TIMEOUT),
    ]
    started = time.monotonic()
    # The slow client holds its Ray actor for ROUND_TIMEOUT + SLOW_EXTRA_S. With one actor per core (2 here) the
    # seven others would queue on the one actor left and, on a loaded machine, time out too: 4 actors keep them
    # off the slow one's actor.
    run_many(configs, client_app=faulty_app, cpus_per_client=0.5)
    print(f"\nsimulation of {len(configs)} runs x {ROUNDS} rounds x {CLIENTS} clients: "
          f"{time.monotonic() - started:.1f} s")
    return {cfg.out.name: cfg.out for cfg in configs}


def test_c_every_malicious_input_is_rejected_with_its_reason_and_the_rounds_go_on(simulated: dict[str, Path]) -> None:
    out = simulated["malicious"]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3], rows
    partition_of = _node_to_partition(out)
    tried: list[str] = []
    for row in rows:
        expected = {p: attack_for(p, row["round"]) for p in range(CLIENTS)}
        attacked = {p: k for p, k in expected.items() if k is not None}
        assert (row["clients_sampled"], row["clients_trained"], row["clients_rejected"], row["clients_failed"]) == (
            CLIENTS, CLIENTS - len(attacked), len(attacked), 0), row
        got = {partition_of[r["node_id"]]: r["reason"] for r in row["rejected"]}
        assert set(got) == set(attacked), (row["round"], got, attacked)
        for partition, kind in attacked.items():
            assert ATTACKS[kind][1] in got[partition], (kind, got[partition])
            tried.append(kind)
    assert sorted(tried) == sorted(ATTACKS), "every bad input must have been sent once"
    clean = _rows(simulated["clean"])
    assert all(r["clients_trained"] == CLIENTS for r in clean), clean
    model = load_file(str(out / "model.safetensors"))
    assert all(np.isfinite(v).all() for v in model.values()), "a bad value reached the global model"
    assert rows[-1]["accuracy"] >= clean[-1]["accuracy"] - 0.05 and rows[-1]["accuracy"] > 0.85, (rows, clean)
    _figure("c-malicious", inputs_tried=len(tried), rejected_with_reason=sum(r["clients_rejected"] for r in rows),
            rounds_completed=len(rows), accuracy=f"{rows[-1]['accuracy']:.3f} (clean {clean[-1]['accuracy']:.3f})",
            server_stayed_up=True, wall_s=rows[-1]["wall_time_s"])


@pytest.mark.parametrize(("run", "reason"), [
    ("slow-plain", "no reply before the round timed out"),
    ("slow-secagg", "timed out in stage collect_masked_vectors"),  # SecAgg+ names the stage it gave up in
])
def test_e_a_client_slower_than_the_round_timeout_is_left_out_and_the_round_completes(
    simulated: dict[str, Path], run: str, reason: str
) -> None:
    out = simulated[run]
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3], rows
    # The slow client never got a reply in, so this run does not know its partition; the runs of one simulation
    # share their nodes, and the clean run knows them all.
    slow_node = {p: n for n, p in _node_to_partition(simulated["clean"]).items()}[SLOW]
    slow_rounds = SLOW_ROUNDS[run]
    for row in rows:
        if row["round"] not in slow_rounds:
            assert (row["clients_trained"], row["clients_failed"]) == (CLIENTS, 0), row
            continue
        assert (row["clients_sampled"], row["clients_trained"], row["clients_failed"]) == (CLIENTS, CLIENTS - 1, 1), row
        (failure,) = row["failed"]
        assert failure["node_id"] == slow_node and reason in failure["reason"], failure
        # The server waited the whole timeout, then went on: had it waited for the slow client (which answers
        # SLOW_EXTRA_S later), its reply would have been counted, not a timeout.
        assert row["round_time_s"] >= ROUND_TIMEOUT, row
    privacy = json.loads((out / "privacy.json").read_text())
    slow = next(c for c in privacy["clients"].values() if c["node_id"] == slow_node)
    assert [f["round"] for f in slow["failures"]] == list(slow_rounds), slow
    assert slow["trained_in_rounds"] == [r for r in (1, 2, 3) if r not in slow_rounds], slow
    assert rows[-1]["accuracy"] > 0.85, rows
    _figure(f"e-{run}", round_timeout_s=ROUND_TIMEOUT, slow_by_s=SLOW_EXTRA_S, rounds_completed=len(rows),
            trained_per_round=[r["clients_trained"] for r in rows],
            round_time_s=[r["round_time_s"] for r in rows], accuracy=f"{rows[-1]['accuracy']:.3f}")


# ------------------------------------------------------------------------------------------------ real processes

SEED = 7


def _ledger_rounds(state: Path) -> list[tuple[str, int]]:
    path = state / LEDGER_FILE
    return list(PrivacyLedger.load(path).rounds) if path.exists() else []


def _wait(condition: Any, timeout: float, what: str, *procs: Cli) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for cli in procs:
            assert cli.proc.poll() is None, f"{what}: a process exited {cli.proc.returncode}:\n{cli.text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.2)


#: A fixed sigma, epsilon only a cap with room for one more round. With the default (sigma calibrated so that
#: exactly the planned rounds reach epsilon 8) the re-run of the interrupted round is charged a second time (see
#: below), every site would pass its budget in round 3 and refuse it: measured, rows 1-3 complete but round 3
#: with 2 refusals and 0 trained.
RESUME_MECHANISM = ["--noise-multiplier", "1.0", "--epsilon", "50"]


def test_b_server_sigkilled_mid_round_resumes_without_losing_a_round(tmp_path: Path) -> None:
    """Round 1 of 3 completes; the server's whole process tree (CLI, SuperLink, SuperExec, ServerApp) is SIGKILLed
    while round 2 trains; ``fedshield server --resume`` on the same run directory (so the same SuperLink database
    and node registrations) continues from round 1's checkpoint, and the sites' SuperNodes, which were never
    stopped, reconnect by themselves."""
    started = time.monotonic()
    keys = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=2)
    sites = digits_sites(tmp_path, 2)
    fleet, control = f"127.0.0.1:{free_port()}", str(free_port())
    out = tmp_path / "run"
    states = [tmp_path / f"state-{i}" for i in (1, 2)]
    common = ["--keys", str(keys.directory), "--address", fleet, "--control-port", control]
    procs: list[Cli] = []
    try:
        server = Cli.start(["server", *common, "--rounds", "3", "--min-clients", "2", "--out", str(out),
                            "--seed", str(SEED), *RESUME_MECHANISM], tmp_path / "server.out")
        procs.append(server)
        server.wait_for(r"registered nodes: node-1, node-2", timeout=120)
        clients = [Cli.start(["client", "--server", fleet, "--ca", str(keys.ca_cert), "--node-key",
                              str(keys.node(f"node-{i}").private_key_path), "--roster", str(keys.authorized_nodes),
                              "--secagg-min-peers", "1", "--max-epsilon", "50",  # the run's own cap (above)
                              "--data", str(data), "--state", str(state)],
                             tmp_path / f"client-{i}.out")
                   for i, (data, state) in enumerate(zip(sites, states), 1)]
        procs.extend(clients)
        node_ids = [int(c.wait_for(r"as node (\d+)", timeout=180).group(1)) for c in clients]
        _wait(lambda: (out / "metrics.jsonl").exists() and len(_rows(out)) >= 1, 300, "round 1", *procs)
        # Mid-round 2: a site has charged its ledger for round 2 (it does so before it trains).
        _wait(lambda: any(r == 2 for s in states for _, r in _ledger_rounds(s)), 120, "round 2 training", *procs)
        before = _rows(out)
        killed_at = time.monotonic()
        server.kill()
        assert len(before) == 1, f"killed too late to prove anything: {before}"
        first = load_checkpoint(out)
        assert first.server_round == 1
        assert all(c.proc.poll() is None for c in clients), "the sites must outlive the server"

        restarted = Cli.start(["server", *common, "--resume", str(out)], tmp_path / "server-resumed.out")
        procs.append(restarted)
        assert restarted.proc.wait(timeout=540) == 0, restarted.text()
        recovered_s = time.monotonic() - killed_at
        for client in clients:
            assert client.proc.poll() is None, client.text()
            assert client.interrupt() == 130, client.text()
    finally:
        for cli in procs:
            cli.interrupt()

    text = restarted.text()
    assert "resuming" in text and "after round 1 of 3" in text, text
    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3], rows
    assert rows[0] == before[0], "the completed round 1 must come back exactly as it was written"
    outcomes = [{k: v for k, v in r.items() if k.startswith("clients_") or k in ("round", "failed", "rejected")} for r in rows]
    assert all(r["clients_trained"] == 2 for r in rows), (outcomes, [c.text()[-2000:] for c in clients])
    last = load_checkpoint(out)
    assert (last.server_round, last.run_id, last.noise_multiplier) == (3, first.run_id, first.noise_multiplier)
    privacy = json.loads((out / "privacy.json").read_text())
    assert len(privacy["clients"]) == 2
    epsilons: list[tuple[float, float]] = []
    for state, node_id in zip(states, node_ids):
        ledger = PrivacyLedger.load(state / LEDGER_FILE)
        (entry,) = [c for c in privacy["clients"].values() if c["node_id"] == node_id]
        assert entry["trained_in_rounds"] == [1, 2, 3]
        # The server's own account, from the mechanism it prescribed: three rounds, recomputable from privacy.json.
        server_eps = recompute_epsilon(entry)
        assert entry["history"] == [[1.0, 0.5, 3 * RunConfig().steps_per_round]], entry["history"]
        # The interrupted round 2 was charged before it trained and charged again when it re-ran: the site's own
        # ledger over-counts, never under-counts; privacy.json reports the larger of the two.
        assert [r for _, r in ledger.rounds] == [1, 2, 2, 3], ledger.rounds
        assert ledger.epsilon > server_eps and entry["ledger_epsilon"] == pytest.approx(ledger.epsilon, rel=1e-9)
        assert entry["epsilon"] == pytest.approx(max(server_eps, ledger.epsilon), rel=1e-9)
        epsilons.append((server_eps, ledger.epsilon))
    _figure("b-server-sigkill-resume", load="2 sites, SecAgg+ and DP-SGD, 3 rounds", faults_survived="1 server "
            "SIGKILL (whole tree) mid-round 2", completed_rounds_lost=0, rounds_repeated="round 2 only (was not "
            "complete)", kill_to_run_finished_s=f"{recovered_s:.1f}", wall_s=f"{time.monotonic() - started:.1f}",
            epsilon_server_vs_ledger=[f"{a:.3f}/{b:.3f}" for a, b in epsilons])


#: Sites in scenario (a), the issue's figure. An idle site is ~0.8 GB resident (its `fedshield client` with torch
#: and the warm worker, a SuperNode, a SuperExec): 20 sites and the server took ~11 GB and 590 s on 2 cores;
#: FEDSHIELD_RELIABILITY_SITES=10 needs about half (331 s).
LOAD_SITES = int(os.environ.get("FEDSHIELD_RELIABILITY_SITES", "20"))
LOAD_KILLED = round(0.3 * LOAD_SITES)


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_a_thirty_percent_of_the_sites_sigkilled_mid_round_then_rejoining(tmp_path: Path) -> None:
    """SecAgg+ and DP-SGD over 3 rounds. Round 1: every site trains. Round 2: 30% of the sites are SIGKILLed
    (client, worker, SuperNode, SuperExec, ClientApp at once) once they have charged their ledger for the round,
    i.e. while they train; SecAgg+ rebuilds their masks from the survivors' shares and the round completes
    without them. They are restarted at once with the same key and state directory, wait until the server has
    noticed the crash (see ``fedshield.deploy.site``), rejoin, and train in round 3."""
    started = time.monotonic()
    keys = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=LOAD_SITES)
    sites = digits_sites(tmp_path, LOAD_SITES)
    fleet, control = f"127.0.0.1:{free_port()}", str(free_port())
    out = tmp_path / "run"
    states = [tmp_path / f"state-{i}" for i in range(1, LOAD_SITES + 1)]

    def client_args(i: int) -> list[str]:
        return ["client", "--server", fleet, "--ca", str(keys.ca_cert), "--node-key",
                str(keys.node(f"node-{i}").private_key_path), "--roster", str(keys.authorized_nodes),
                "--secagg-min-peers", "1", "--data", str(sites[i - 1]), "--state", str(states[i - 1])]

    procs: list[Cli] = []
    try:
        server = Cli.start(["server", "--keys", str(keys.directory), "--address", fleet, "--control-port", control,
                            "--rounds", "3", "--min-clients", str(LOAD_SITES), "--out", str(out), "--seed",
                            str(SEED)], tmp_path / "server.out")
        procs.append(server)
        server.wait_for(r"registered nodes: node-1, ", timeout=300)
        clients = [Cli.start(client_args(i), tmp_path / f"client-{i}.out") for i in range(1, LOAD_SITES + 1)]
        procs.extend(clients)
        node_ids = [int(c.wait_for(r"as node (\d+)", timeout=600).group(1)) for c in clients]
        online_s = time.monotonic() - started
        _wait(lambda: (out / "metrics.jsonl").exists() and len(_rows(out)) >= 1, 900, "round 1", server)
        victims = list(range(LOAD_KILLED))  # sites node-1 .. node-K
        alive = set(victims)
        deadline = time.monotonic() + 600
        while alive:  # each victim dies the moment its round-2 charge is on disk, before it can reply
            for v in sorted(alive):
                if any(r == 2 for _, r in _ledger_rounds(states[v])):
                    clients[v].kill()
                    alive.discard(v)
            assert time.monotonic() < deadline and server.proc.poll() is None, "round 2 never started training"
            time.sleep(0.05)
        killed_at = time.monotonic()
        assert len(_rows(out)) == 1, "round 2 completed before the kills: they proved nothing"
        rejoined = [Cli.start(client_args(v + 1), tmp_path / f"client-{v + 1}-rejoined.out") for v in victims]
        procs.extend(rejoined)
        rejoined_ids = [int(c.wait_for(r"as node (\d+)", timeout=600).group(1)) for c in rejoined]
        rejoin_s = time.monotonic() - killed_at
        assert server.proc.wait(timeout=1800) == 0, server.text()
        for cli in [*clients[LOAD_KILLED:], *rejoined]:
            assert cli.proc.poll() is None, cli.text()
    finally:
        for cli in procs:
            cli.interrupt()

    rows = _rows(out)
    assert [r["round"] for r in rows] == [1, 2, 3], rows
    victim_ids = {node_ids[v] for v in victims}
    assert set(rejoined_ids) == victim_ids, "a site that rejoins keeps its node (its registered key)"
    assert (rows[0]["clients_trained"], rows[0]["clients_failed"]) == (LOAD_SITES, 0), rows[0]
    assert (rows[1]["clients_sampled"], rows[1]["clients_trained"], rows[1]["clients_failed"]) == (
        LOAD_SITES, LOAD_SITES - LOAD_KILLED, LOAD_KILLED), rows[1]
    assert {f["node_id"] for f in rows[1]["failed"]} == victim_ids, rows[1]["failed"]
    assert (rows[2]["clients_trained"], rows[2]["clients_failed"]) == (LOAD_SITES, 0), rows[2]
    privacy = json.loads((out / "privacy.json").read_text())
    for state, node_id in zip(states, node_ids):
        (entry,) = [c for c in privacy["clients"].values() if c["node_id"] == node_id]
        ledger = PrivacyLedger.load(state / LEDGER_FILE)
        assert [r for _, r in ledger.rounds] == [1, 2, 3], (node_id, ledger.rounds)  # victims: charged, killed
        assert ledger.epsilon >= recompute_epsilon(entry) - 1e-9, "a site's ledger may never under-count"
        if node_id in victim_ids:
            assert entry["trained_in_rounds"] == [1, 3] and [f["round"] for f in entry["failures"]] == [2]
        else:
            assert entry["trained_in_rounds"] == [1, 2, 3]
            assert entry["epsilon"] == pytest.approx(recompute_epsilon(entry), rel=1e-9)
    assert float(rows[-1]["accuracy"]) > 0.15  # above chance (0.1) under DP at epsilon 8 in 3 rounds
    _figure("a-sites-killed-and-rejoining", load=f"{LOAD_SITES} sites, SecAgg+ and DP-SGD, 3 rounds",
            faults_survived=f"{LOAD_KILLED} sites SIGKILLed mid-round 2", trained_per_round=[r["clients_trained"]
            for r in rows], rejoined=f"{len(rejoined_ids)}/{LOAD_KILLED} in {rejoin_s:.0f} s", completed_rounds_lost=0,
            round_time_s=[r["round_time_s"] for r in rows], sites_online_s=f"{online_s:.0f}",
            wall_s=f"{time.monotonic() - started:.0f}")
