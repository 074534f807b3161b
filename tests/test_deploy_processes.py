"""Real Flower 1.39 processes on 127.0.0.1: a TLS SuperLink with node authentication, SuperNodes, and `flwr run`.

One SuperLink and two registered SuperNodes serve the whole module. The refusal tests run first and check that the
registered nodes carry on; the run tests then prove it with a completed FedAvg round. Every process started here
is stopped by PID, and the module fails if any of them, or any of their children, is left running.
"""

from __future__ import annotations

import json
import sys
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedshield.crypto import KeySet, add_node, init_keys
from fedshield.deploy import (
    DeploymentError,
    FlowerProcess,
    PortInUseError,
    ServerTls,
    SuperLink,
    SuperLinkConfig,
    SuperNode,
    SuperNodeConfig,
    free_port,
    run_app,
    run_status,
    start_superlink,
    start_supernode,
)
from fedshield.deploy.process import flower_env, live_descendants

ECHO_APP = Path(__file__).parent / "apps" / "echo_app"
# Flower SuperNodes retry forever by default; a refused test node must give up quickly instead.
QUICK_GIVE_UP = {"max_retries": 2, "max_wait_time": 15.0}


@dataclass
class Federation:
    keys: KeySet
    run_dir: Path
    superlink: SuperLink
    nodes: list[SuperNode]
    started: list[FlowerProcess]

    def supernode(self, name: str, **overrides: object) -> SuperNodeConfig:
        """Config for a node of this federation; ``overrides`` change what a test wants to break."""
        node = self.keys.node(name) if name in {n.name for n in self.keys.nodes} else None
        fields: dict[str, object] = {
            "run_dir": self.run_dir / "nodes",
            "superlink": self.superlink.fleet_address,
            "root_certificates": self.keys.ca_cert,
            "private_key": node.private_key_path if node else None,
            "runtime_port": free_port(),
            "name": name,
            "site_code_only": False,  # these tests run the generic echo app, whose ClientApp ships in its bundle
        }
        fields.update(overrides)
        return SuperNodeConfig(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    keys = init_keys(root / "keys", server_hosts=["127.0.0.1"], nodes=2)
    config = SuperLinkConfig(
        run_dir=root / "superlink",
        fleet_address=f"127.0.0.1:{free_port()}",
        control_port=free_port(),
        tls=ServerTls.from_keyset(keys),
        node_auth=True,
    )
    superlink = start_superlink(config)
    fed = Federation(keys, root, superlink, [], [superlink.process])
    try:
        for node in keys.nodes:
            superlink.register_node(node.public_key, name=node.name)
        for index, node in enumerate(keys.nodes, start=1):
            config_n = fed.supernode(node.name, node_config={"partition-id": index, "site": f"site {index}"})
            fed.nodes.append(start_supernode(config_n, wait=False))
            fed.started.append(fed.nodes[-1].process)
        for sn in fed.nodes:
            sn.wait_connected(timeout=60)
        yield fed
    finally:
        for process in reversed(fed.started):
            process.stop(grace=10)
        leftovers = {p.name: p.remaining_pids() for p in fed.started if p.remaining_pids()}
        assert not leftovers, f"processes left running: {leftovers}"
        assert live_descendants() == [], "the test left child processes behind"


def _assert_registered_nodes_still_online(fed: Federation) -> None:
    assert all(sn.process.is_running() for sn in fed.nodes)
    status = {int(n["node-id"]): n["status"] for n in fed.superlink.list_nodes()}
    assert all(status[sn.node_id] == "online" for sn in fed.nodes if sn.node_id is not None), status


# ------------------------------------------------------------------------------------------------ connections


def test_registered_nodes_connect_with_tls_and_their_keys(federation: Federation) -> None:
    ids = [sn.node_id for sn in federation.nodes]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == 2
    _assert_registered_nodes_still_online(federation)


def test_registering_a_known_key_again_is_not_an_error(federation: Federation) -> None:
    node = federation.keys.nodes[0]
    assert federation.superlink.register_node(node.public_key, name=node.name) is None


def test_an_unregistered_node_key_is_refused(federation: Federation) -> None:
    add_node(federation.keys.directory, name="intruder")  # authorized on disk, never registered on the SuperLink
    key_path = federation.keys.directory / "intruder.key"
    config = federation.supernode("intruder", private_key=key_path, **QUICK_GIVE_UP)
    node = start_supernode(config, wait=False)
    federation.started.append(node.process)
    with pytest.raises(DeploymentError, match=r"code 2004"):
        node.wait_connected(timeout=60)
    node.process.wait(timeout=30)
    assert node.process.returncode != 0
    assert "[code: 2004] Failed to activate SuperNode" in node.process.log_text()
    assert node.process.flower_exit_code() == 305
    _assert_registered_nodes_still_online(federation)


def test_a_node_trusting_another_ca_fails_the_tls_handshake(federation: Federation, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other", server_hosts=["127.0.0.1"], nodes=0)
    node_1_key = federation.keys.node("node-1").private_key_path
    config = federation.supernode("wrong-ca", root_certificates=other.ca_cert, private_key=node_1_key, **QUICK_GIVE_UP)
    node = start_supernode(config, wait=False)
    federation.started.append(node.process)
    with pytest.raises(DeploymentError, match=r"TLS handshake failed"):
        node.wait_connected(timeout=60)
    assert "CERTIFICATE_VERIFY_FAILED" in node.process.log_text()
    _assert_registered_nodes_still_online(federation)


def test_a_plaintext_node_cannot_talk_to_the_tls_superlink(federation: Federation) -> None:
    config = federation.supernode("plain", root_certificates=None, private_key=None, insecure=True, **QUICK_GIVE_UP)
    node = start_supernode(config, wait=False)
    federation.started.append(node.process)
    with pytest.raises(DeploymentError, match=r"did not connect"):
        node.wait_connected(timeout=60)
    assert node.process.flower_exit_code() == 305
    _assert_registered_nodes_still_online(federation)


# ------------------------------------------------------------------------------------------------ runs


def test_an_echo_round_completes_through_flwr_run(federation: Federation) -> None:
    out = federation.run_dir / "echo-result.json"
    started = time.monotonic()
    result = run_app(ECHO_APP, federation.superlink.connection, run_config={"out-file": str(out)}, timeout=180)
    wall = time.monotonic() - started
    assert result.completed, f"{result.status}: {result.details}\n{result.log}"
    assert result.status == "finished:completed"
    report = json.loads(out.read_text())
    assert report["arrays"] == [[1.0, 1.0, 1.0], [[1.0, 2.0], [3.0, 4.0]]]  # FedAvg of (initial + 1) twice
    assert report["mean_partition"] == pytest.approx(1.5)  # node config 1 and 2 reached the ClientApps
    print(f"\necho round: {report['seconds']:.2f} s in strategy.start, run {result.elapsed_s:.2f} s, wall {wall:.2f} s")


def test_a_crashing_serverapp_is_a_failed_run_not_a_success(federation: Federation) -> None:
    result = run_app(ECHO_APP, federation.superlink.connection, run_config={"fail": True}, timeout=120)
    assert result.status == "finished:failed" and not result.completed
    assert "asked to fail" in result.details
    assert "RuntimeError: echo app was asked to fail" in result.log


def test_run_status_asked_in_process_is_what_flwr_list_prints(federation: Federation) -> None:
    """run_status is one Control API request from this process, not a `flwr list` process (~1.3 s of CPU per
    check, taken from the sites): the same record as the command prints, and a one-line error for an unknown run."""
    conn = federation.superlink.connection
    listed = conn.run_json(["list", conn.name])["runs"]
    if not any(str(r["status"]).startswith("finished") for r in listed):  # this test alone: one quick failed run
        run_app(ECHO_APP, conn, run_config={"fail": True}, timeout=120)
        listed = conn.run_json(["list", conn.name])["runs"]
    finished = [r for r in listed if str(r["status"]).startswith("finished")]
    assert finished
    for run in finished:
        assert run_status(conn, int(run["run-id"])) == run
    with pytest.raises(DeploymentError, match=r"has no run 1\.$"):
        run_status(conn, 1)


def test_an_unknown_run_config_key_is_named(federation: Federation) -> None:
    with pytest.raises(DeploymentError, match=r"\['no-such-key'\] are not in \[tool\.flwr\.app\.config\]"):
        run_app(ECHO_APP, federation.superlink.connection, run_config={"no-such-key": 1}, timeout=30)


# ------------------------------------------------------------------------------------------------ ports, config


def test_a_busy_fleet_port_gives_a_clear_error_before_anything_starts(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        fleet = f"127.0.0.1:{port}"
        config = SuperLinkConfig(
            run_dir=tmp_path, fleet_address=fleet, control_port=free_port(), insecure=True, node_auth=False
        )
        with pytest.raises(PortInUseError, match=rf"Port {port} on 127\.0\.0\.1 is already in use.*--fleet-port"):
            start_superlink(config)
    assert not (tmp_path / "superlink.log").exists()  # nothing was started


def test_a_busy_supernode_port_gives_a_clear_error(federation: Federation) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError, match=rf"Port {port} .*--port"):
            start_supernode(federation.supernode("node-1", runtime_port=port))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"insecure": True}, "authentication needs TLS"),
        ({"insecure": False}, "needs TLS files"),
        ({"insecure": True, "node_auth": False, "fleet_address": "9092"}, "HOST:PORT"),
    ],
)
def test_superlink_config_refuses_unsafe_or_malformed_settings(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(DeploymentError, match=match):
        SuperLinkConfig(run_dir=tmp_path, **kwargs)


# ------------------------------------------------------------------------------------------------ process control


_DETACHING_PARENT = """
import signal, subprocess, sys, time
# Like flower-superlink: start a helper in a new session (which here also ignores SIGTERM), then run on.
child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('child up', flush=True); "
subprocess.Popen([sys.executable, "-c", child + "time.sleep(120)"], start_new_session=True)
time.sleep(120)
"""


def test_stop_reaches_a_helper_in_another_session_that_ignores_sigterm(tmp_path: Path) -> None:
    process = FlowerProcess(
        "detacher", [sys.executable, "-c", _DETACHING_PARENT], log_path=tmp_path / "p.log",
        env=flower_env(tmp_path / "home"), cwd=tmp_path,
    )  # fmt: skip
    try:
        process.wait_for_log("child up", timeout=30)  # also records the helper's process group
        started = process.remaining_pids()
        assert len(started) == 2
    finally:
        process.stop(grace=1.0)
    assert process.remaining_pids() == []
    assert not set(started) & set(live_descendants()) and not any(_alive(pid) for pid in started)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
