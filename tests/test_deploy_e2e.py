"""A real federation on 127.0.0.1: ``fedshield server`` and ``fedshield client`` as processes, TLS, node
authentication, SecAgg+ and DP-SGD, each client with its own data file and state directory.

Two federations share one key set:

* the CLI one: ``python -m fedshield server`` and three ``python -m fedshield client`` processes run two private,
  securely aggregated rounds; then every file they wrote is checked against the others;
* the library one (``fedshield.deploy.coordinator`` / ``fedshield.deploy.site``): one SuperLink and its
  SuperNodes refuse a wrong CA and an unregistered key, then serve two one-round runs that both aggregate exactly
  node-1 and node-2: a SecAgg+ round in which node-3 is SIGKILLed mid-round, and a plain round that node-4 (a site
  requiring SecAgg+) refuses. The two models must agree up to SecAgg+'s quantisation.

Deployment rounds are slow on Flower 1.39 (every message starts a ``flwr-clientapp`` process that imports torch;
SecAgg+ sends four messages per node and round; everything polls every 1-3 s), so runs are one or two rounds and
checks are combined. Every process is started and stopped here by PID; ``no_leftover_processes`` fails a test
that leaves one behind.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from _processes import Cli, digits_sites, kill_tree
from safetensors.numpy import load_file

from fedshield.client.app import PLAIN_REFUSAL
from fedshield.client.site import load_site_files
from fedshield.deploy.site import ClientOptions, FedshieldClient, start_client
from fedshield.config import RunConfig
from fedshield.crypto import KeySet, add_node, init_keys
from fedshield.deploy import DeploymentError, RunResult, free_port
from fedshield.deploy.process import live_descendants
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedshield.protocol import NODE_HEARTBEAT_S
from fedshield.deploy.coordinator import FedshieldServer, ServerOptions, start_server
from fedshield.server.report import recompute_epsilon
from fedshield.tasks import get_task
from fedshield.training import train_plain


pytestmark = pytest.mark.usefixtures("no_leftover_processes")

SITES = 3
SEED = 7
# SecAgg+ as fedshield.server.runner builds it: updates clipped to +-8, 2^22 levels, weights / max_weight 1000.
CLIP, LEVELS, MAX_WEIGHT = 8.0, 2**22, 1000.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    """One key set for both federations: node-1..3 are the sites, node-4 a site that refuses plain rounds."""
    return init_keys(tmp_path_factory.mktemp("keys") / "keys", server_hosts=["127.0.0.1"], nodes=SITES + 1)


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return digits_sites(tmp_path_factory.mktemp("sites"), SITES)


# ------------------------------------------------------------------------------------------------ process helpers


def clientapp_pids(pid: int) -> set[int]:
    """The ``flwr-clientapp`` processes (one per message) running under a SuperNode."""
    found = set()
    for p in live_descendants(pid):
        try:
            if b"flwr-clientapp" in Path(f"/proc/{p}/cmdline").read_bytes():
                found.add(p)
        except OSError:
            continue
    return found


def read_rows(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def entry_for(privacy: dict[str, object], node_id: int) -> dict[str, object]:
    clients = privacy["clients"]
    assert isinstance(clients, dict)
    (entry,) = [c for c in clients.values() if int(c["node_id"]) == node_id]
    return entry


# ------------------------------------------------------------------------------------------------ the CLI federation


def test_cli_server_and_three_clients_complete_two_private_secure_rounds(
    keys: KeySet, sites: list[Path], tmp_path: Path
) -> None:
    fleet = f"127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    started: list[Cli] = []
    try:
        server = Cli.start(["server", "--keys", str(keys.directory), "--address", fleet, "--control-port",
                            str(free_port()), "--rounds", "2", "--min-clients", str(SITES), "--out", str(out),
                            "--seed", str(SEED)], tmp_path / "server.out")
        started.append(server)
        server.wait_for(r"registered nodes: node-1, node-2, node-3", timeout=90)
        clients = []
        for i, data in enumerate(sites, 1):
            clients.append(Cli.start(
                ["client", "--server", fleet, "--ca", str(keys.ca_cert), "--node-key",
                 str(keys.node(f"node-{i}").private_key_path), "--roster", str(keys.authorized_nodes), "--data",
                 str(data), "--state", str(tmp_path / f"state-{i}")], tmp_path / f"client-{i}.out"))
            started.append(clients[-1])
        node_ids = [int(c.wait_for(r"as node (\d+)", timeout=120).group(1)) for c in clients]
        assert server.proc.wait(timeout=540) == 0, server.text()
        for client in clients:  # they kept serving after the run; Ctrl-C stops them cleanly
            assert client.proc.poll() is None, client.text()
            assert client.interrupt() == 130, client.text()
    finally:
        for cli in started:
            cli.interrupt()

    text = server.text()
    assert "round   1/2" in text and "round   2/2" in text and "finished:completed" in text, text
    assert "trained 3/3" in text and "guarantee: (" in text
    rows = read_rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_sampled"] == r["clients_trained"] == SITES for r in rows), rows
    assert 0.15 < float(rows[-1]["accuracy"]) <= 1.0  # trained beyond chance (0.1), under DP at eps 8 in 2 rounds
    privacy = json.loads((out / "privacy.json").read_text())
    assert len(privacy["clients"]) == SITES and privacy["dp"] is True
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    for i, node_id in enumerate(node_ids, 1):
        entry = entry_for(privacy, node_id)
        assert entry["rounds_trained"] == 2 and entry["failures"] == []
        assert entry["epsilon"] == pytest.approx(recompute_epsilon(entry), rel=1e-9)
        ledger = PrivacyLedger.load(tmp_path / f"state-{i}" / LEDGER_FILE)
        assert ledger.steps == entry["steps"] and len(ledger.rounds) == 2
        assert ledger.epsilon == pytest.approx(entry["epsilon"], rel=1e-9)
        assert entry["ledger_epsilon"] == pytest.approx(ledger.epsilon, rel=1e-9)
        assert ledger.epsilon <= 8.0 + 1e-6  # the planned budget holds
        assert "charged a DP round" in clients[i - 1].text()
        # Each site received 7 messages: round 1's SETUP, SHARE_KEYS, masked-vector request and UNMASK (which
        # carried round 2's keys), round 2's masked-vector request and UNMASK, the last round's evaluation. Only
        # the three that train or evaluate started a ClientApp; the SuperNode answered the four key and unmask
        # stages itself (fedshield.deploy.node_stages).
        log = (tmp_path / f"state-{i}" / "supernode.log").read_text()
        assert (log.count("Receiving: "), log.count("Start `flwr-clientapp` process")) == (7, 3), log[-3000:]


def test_ctrl_c_stops_the_run_and_every_server_process(keys: KeySet, tmp_path: Path) -> None:
    """A server waiting for its sites is interrupted: the run is stopped (Flower's StopRun), the SuperLink (and its
    SuperExec and ServerApp) by PID, and the command exits 130. It was started as a shell without job control
    starts a background command, with SIGINT ignored: Ctrl-C must stop it all the same."""
    server = Cli.start(["server", "--keys", str(keys.directory), "--address", f"127.0.0.1:{free_port()}",
                        "--control-port", str(free_port()), "--rounds", "1", "--min-clients", "2", "--out",
                        str(tmp_path / "run")], tmp_path / "server.out", sigint_ignored=True)
    try:
        run_id = server.wait_for(r"run (\d+): task=", timeout=120).group(1)
        server.wait_for(r"clients online: waiting for clients", timeout=120)
        assert live_descendants(server.proc.pid), "the SuperLink should be running under the server command"
    finally:
        code = server.interrupt()
    assert code == 130, server.text()
    assert f"interrupted: stopping run {run_id}" in server.text()
    assert "Application shutdown complete" in (tmp_path / "run" / "superlink" / "superlink.log").read_text()


# ------------------------------------------------------------------------------------------------ the library federation


@dataclass
class Federation:
    root: Path
    keys: KeySet
    sites: list[Path]
    server: FedshieldServer
    clients: dict[str, FedshieldClient] = field(default_factory=dict)
    options: dict[str, ClientOptions] = field(default_factory=dict)

    @property
    def fleet(self) -> str:
        return self.server.superlink.fleet_address

    def site_options(self, name: str, data: Path, **changes: object) -> ClientOptions:
        fields: dict[str, object] = {
            "server": self.fleet, "data": data, "state_dir": self.root / f"state-{name}", "ca_cert": self.keys.ca_cert,
            "node_key": self.keys.node(name).private_key_path, "connect_attempts": 3, "retry_wait": 0.5,
            # These sites accept rounds without DP (DETERMINISTIC below compares SecAgg+ with plain training);
            # a site refuses them by default (fedshield.client.policy).
            "allow_no_dp": True,
            "roster": self.keys.authorized_nodes,
        }
        fields.update(changes)
        return ClientOptions(**fields)  # type: ignore[arg-type]

    def join(self, name: str, data: Path, **changes: object) -> FedshieldClient:
        self.options[name] = self.site_options(name, data, **changes)
        self.clients[name] = start_client(self.options[name])
        return self.clients[name]

    def run(self, name: str, **changes: object) -> tuple[RunResult, RunConfig, Path]:
        settings: dict[str, object] = {"num_clients": SITES, "num_rounds": 1, "seed": SEED, "out": self.root / name}
        config = RunConfig(**{**settings, **changes})  # type: ignore[arg-type]
        run_id = self.server.submit(config)
        return self.follow(run_id, config)

    def follow(self, run_id: int, config: RunConfig) -> tuple[RunResult, RunConfig, Path]:
        result = self.server.follow(run_id, config, status_every_s=5.0, timeout=400)
        assert result.completed, f"{result.status}: {result.details}\n{result.log[-3000:]}"
        return result, config, Path(config.out)


@pytest.fixture(scope="module")
def federation(keys: KeySet, sites: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    options = ServerOptions(keys=keys.directory, fleet_address=f"127.0.0.1:{free_port()}", control_port=free_port())
    server = start_server(options, home=root / "superlink")
    fed = Federation(root, keys, sites, server)
    try:
        for i, data in enumerate(sites, 1):  # these sites also train in plain rounds: the comparison needs both
            fed.join(f"node-{i}", data, allow_plain_updates=True)
        yield fed
    finally:
        for client in fed.clients.values():
            client.stop()
        server.close()
        assert live_descendants() == [], "the federation left processes behind"


def _model(out: Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "model.safetensors"))


def test_a_wrong_ca_and_an_unregistered_key_are_refused_in_one_line(federation: Federation, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other", server_hosts=["127.0.0.1"], nodes=0)
    wrong_ca = federation.site_options("node-1", federation.sites[0], ca_cert=other.ca_cert,
                                       state_dir=tmp_path / "wrong-ca")
    with pytest.raises(DeploymentError, match=r"^TLS check of the server at .* is not signed by the CA in"):
        start_client(wrong_ca)
    assert not (tmp_path / "wrong-ca" / "supernode.log").exists(), "refused before any SuperNode started"
    intruder_key = add_node(federation.keys.directory, name="intruder")  # authorized on disk, never registered
    proc = subprocess.run(
        [sys.executable, "-m", "fedshield", "client", "--server", federation.fleet, "--ca", str(federation.keys.ca_cert),
         "--node-key", str(intruder_key), "--roster", str(federation.keys.authorized_nodes), "--data", str(federation.sites[0]), "--state", str(tmp_path / "intruder")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: the server at {federation.fleet} did not accept this client: ") and \
        "code 2004" in line and "fedshield keys add-node" in line, line
    assert all(c.is_running() for c in federation.clients.values()), "refusals must not disturb the others"
    # Every site announced fedshield's heartbeat, not Flower's 30 s: the SuperLink's own record of its nodes.
    with sqlite3.connect(federation.root / "superlink" / "superlink-state.db") as db:
        intervals = {row[0] for row in db.execute("SELECT heartbeat_interval FROM node WHERE status = 'online'")}
    assert intervals == {NODE_HEARTBEAT_S}, intervals


@dataclass(frozen=True)
class Runs:
    """Two one-round runs that both aggregate exactly node-1 and node-2 (see :func:`runs`)."""

    secure: Path
    plain: Path
    victim: int
    strict: int
    strict_survived: bool


# Without DP a round is deterministic when every client takes full-batch steps (sample rate 1): the order of a
# batch's examples, all that a deployed client then draws from OS entropy, changes a gradient only by float
# rounding. That is what lets a SecAgg+ model be compared with a plain one.
DETERMINISTIC = {"dp": False, "sample_rate": 1.0, "local_epochs": 2, "lr": 1.0}


@pytest.fixture(scope="module")
def runs(federation: Federation) -> Runs:
    """1. SecAgg+ with node-1..3 online and at least 2 required; node-3 is SIGKILLed (SuperNode, SuperExec and
    ClientApp: a crashed site) once it starts computing its masked update. SecAgg+ gives every node a share of
    every other node's secrets, threshold round(0.66 x 3) = 2: the server learns from Flower that node-3 is gone
    (two missed heartbeats of protocol.NODE_HEARTBEAT_S, <= 30 s), rebuilds node-3's masks from the others' shares and completes the round
    with node-1 and node-2.
    2. node-4, a site that requires SecAgg+ (no --allow-plain-updates), joins; a plain round with node-1, node-2
    and node-4: node-4 refuses, so this round too aggregates exactly node-1 and node-2, in clear."""
    victim = federation.clients["node-3"]
    config = RunConfig(num_clients=2, num_rounds=1, seed=SEED, secagg=True, out=federation.root / "secure",
                       **DETERMINISTIC)  # type: ignore[arg-type]
    run_id = federation.server.submit(config)
    seen: set[int] = set()
    deadline = time.monotonic() + 240
    # SETUP and SHARE_KEYS are answered by node-3's SuperNode itself (fedshield.deploy.node_stages): its first
    # ClientApp is COLLECT_MASKED_VECTORS, the one that trains.
    while not seen:
        assert time.monotonic() < deadline, "node-3 never started a ClientApp for its masked vector"
        seen |= clientapp_pids(victim.supernode.process.pid)
        time.sleep(0.05)
    kill_tree(victim.supernode.process.pid)
    victim.stop(grace=2.0)  # reaps what the kill left
    federation.follow(run_id, config)
    strict = federation.join("node-4", federation.sites[0])  # allow_plain_updates defaults to False
    _, _, plain = federation.run("plain", secagg=False, num_clients=3, **DETERMINISTIC)
    return Runs(Path(config.out), plain, int(victim.node_id or 0), int(strict.node_id or 0), strict.is_running())


def test_a_client_killed_during_a_secagg_round_leaves_the_round_to_the_other_two(runs: Runs) -> None:
    (row,) = read_rows(runs.secure)
    assert (row["clients_sampled"], row["clients_trained"], row["clients_failed"]) == (3, 2, 1), row
    privacy = json.loads((runs.secure / "privacy.json").read_text())
    assert [f["round"] for f in entry_for(privacy, runs.victim)["failures"]] == [1]
    initial = {k: v.numpy() for k, v in get_task("digits").new_model(SEED).state_dict().items()}
    model = _model(runs.secure)
    assert max(float(np.max(np.abs(model[k] - initial[k]))) for k in model) > 1e-2, "the round changed nothing"


def _order_spread(federation: Federation) -> float:
    """How far a site's plain training moves when only the order of its examples changes, all that a deployed
    client draws from OS entropy in these runs (full batches, no DP): the largest weight difference between three
    orders of node-1's and of node-2's own training split, with the runs' settings. Measured here, because it
    depends on the data and the float rounding of this machine's kernels (seen up to 1.3e-5)."""
    task = get_task("digits")
    worst = 0.0
    for i in (1, 2):
        train, _ = load_site_files("digits", str(federation.sites[i - 1]), "", str(federation.root / f"state-node-{i}"))
        states = []
        for order in range(3):
            model = task.new_model(SEED)
            train_plain(model, train, sample_rate=DETERMINISTIC["sample_rate"], epochs=DETERMINISTIC["local_epochs"],
                        lr=DETERMINISTIC["lr"], loss_fn=task.loss_fn(), generator=torch.Generator().manual_seed(order))
            states.append({k: v.detach().numpy() for k, v in model.state_dict().items()})
        worst = max([worst] + [float(np.max(np.abs(a[k] - b[k]))) for a, b in itertools.combinations(states, 2)
                               for k in a])
    return worst


def test_secagg_gives_the_plain_model_up_to_quantization(runs: Runs, federation: Federation) -> None:
    """Both runs averaged the updates of node-1 and node-2 from the same initial model (seed 7). SecAgg+ clips
    each client's weighted update (update x examples / max_weight) to +-8 and rounds it stochastically to one of
    2^22 levels: an error below one level (16 / 2^22) per value, times max_weight / examples once averaged."""
    secure, plain = _model(runs.secure), _model(runs.plain)
    initial = {k: v.numpy() for k, v in get_task("digits").new_model(SEED).state_dict().items()}
    examples = [federation.clients[f"node-{i}"].check.train_examples for i in (1, 2)]
    quantization = 2 * (2 * CLIP / LEVELS) * MAX_WEIGHT / sum(examples)  # 2 clients
    tolerance = quantization + 2 * _order_spread(federation) + 1e-6  # + float32 summation of the average
    assert set(secure) == set(plain) == set(initial)
    worst = max(float(np.max(np.abs(secure[k] - plain[k]))) for k in secure)
    moved = max(float(np.max(np.abs(plain[k] - initial[k]))) for k in plain)
    assert worst <= tolerance, f"SecAgg+ model differs from the plain one by {worst:.3g} > {tolerance:.3g}"
    # The round moved the model by orders of magnitude more than the tolerance (~0.04 against ~4e-5 here; the
    # factor was 1000 until a run measured 930: the order spread is drawn afresh each run).
    assert moved > 100 * tolerance, "the round did not train: the comparison would prove nothing"


def test_a_client_that_requires_secagg_refuses_a_plain_round(runs: Runs) -> None:
    (row,) = read_rows(runs.plain)
    assert (row["clients_sampled"], row["clients_trained"], row["clients_failed"]) == (3, 2, 1), row
    privacy = json.loads((runs.plain / "privacy.json").read_text())
    (failure,) = entry_for(privacy, runs.strict)["failures"]
    assert failure["round"] == 1 and failure["reason"].startswith(PLAIN_REFUSAL)
    assert "--allow-plain-updates" in failure["reason"]
    assert runs.strict_survived, "refusing must not cost the site its SuperNode"
