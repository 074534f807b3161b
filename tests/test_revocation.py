"""Revocation with real processes: a TLS SuperLink with node authentication started by ``fedshield server``'s own
``start_server``, real SuperNodes, and the real ``fedshield keys`` CLI in between.

1. A server admits node-1 and node-2; node-2 connects.
2. ``fedshield keys remove-node node-2`` (a real process); the server restarts on the same database: node-2's key,
   which the database still held, is refused (code 2004) while node-1's is admitted.
3. ``fedshield keys add-node --server-out RUN`` against the RUNNING server registers node-3 at once: it connects
   without a restart.

The same running server checks two messages: a second SuperNode with an already-connected key is told so (not
only "unknown key"), and an ``--insecure`` client is told at once that the server speaks TLS.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _processes import digits_sites

from fedshield.crypto import init_keys
from fedshield.deploy import DeploymentError, SuperNode, SuperNodeConfig, free_port, start_supernode
from fedshield.deploy.process import live_descendants
from fedshield.deploy.coordinator import FedshieldServer, ServerOptions, start_server

QUICK_GIVE_UP = {"max_retries": 2, "max_wait_time": 15.0}


def _fedshield(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedshield", *args], capture_output=True, text=True, timeout=180,
                          check=False)


class _Started:
    def __init__(self) -> None:
        self.servers: list[FedshieldServer] = []
        self.nodes: list[SuperNode] = []

    def server(self, keys: Path, run: Path, fleet: str, control: int) -> FedshieldServer:
        server = start_server(ServerOptions(keys=keys, fleet_address=fleet, control_port=control), home=run / "superlink")
        self.servers.append(server)
        return server

    def node(self, server: FedshieldServer, run: Path, name: str, key: Path, **extra: object) -> SuperNode:
        config = SuperNodeConfig(run_dir=run / "nodes", superlink=server.superlink.fleet_address,
                                 root_certificates=run / "keys" / "ca.pem", private_key=key, runtime_port=free_port(),
                                 name=name, **extra)  # type: ignore[arg-type]
        node = start_supernode(config, wait=False)
        self.nodes.append(node)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(grace=5)
        for server in self.servers:
            server.close(grace=5)


@pytest.fixture
def started() -> Iterator[_Started]:
    s = _Started()
    try:
        yield s
    finally:
        s.stop()
        assert live_descendants() == [], "the test left child processes behind"


def test_a_removed_key_is_refused_after_a_restart_and_an_added_key_connects(tmp_path: Path, started: _Started) -> None:
    keys = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=2).directory
    fleet, control = f"127.0.0.1:{free_port()}", free_port()
    removed_key = shutil.copy(keys / "node-2.key", tmp_path / "revoked-node-2.key")  # what the site still holds

    server = started.server(keys, tmp_path, fleet, control)
    node2 = started.node(server, tmp_path, "node-2", Path(removed_key))
    node2.wait_connected(timeout=90)
    node2.stop(grace=5)
    server.close(grace=5)

    done = _fedshield("keys", "remove-node", "node-2", "--keys", str(keys))
    assert done.returncode == 0, done.stderr
    assert "Removed node-2" in done.stdout and not (keys / "node-2.key").exists()

    server = started.server(keys, tmp_path, fleet, control)  # same database: node-2 was still registered there
    stored = {n.node_id: n.status for n in server.superlink.stored_nodes()}
    assert stored[node2.node_id] == "unregistered", stored
    revoked = started.node(server, tmp_path, "node-2-again", Path(removed_key), **QUICK_GIVE_UP)
    with pytest.raises(DeploymentError, match=r"code 2004"):
        revoked.wait_connected(timeout=90)
    node1 = started.node(server, tmp_path, "node-1", keys / "node-1.key")
    node1.wait_connected(timeout=90)
    # Messages: a second client with node-1's key, and an --insecure client, against this real TLS server.
    twin = started.node(server, tmp_path, "node-1-twin", keys / "node-1.key", **QUICK_GIVE_UP)
    with pytest.raises(DeploymentError, match=r"another client with this same node key is connected right now"):
        twin.wait_connected(timeout=90)
    [csv] = digits_sites(tmp_path, 1)
    done = _fedshield("client", "--insecure", "--server", fleet, "--data", str(csv), "--state", str(tmp_path / "s"),
                      "--connect-attempts", "1")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: the server at {fleet} uses TLS but this client runs with --insecure: drop --insecure and pass "
        "--ca ca.pem and --node-key node-N.key from the server's `fedshield keys init`"], done.stderr

    done = _fedshield("keys", "add-node", "--keys", str(keys), "--name", "node-3", "--server-out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "Registered node-3 with the server" in done.stdout, done.stdout
    node3 = started.node(server, tmp_path, "node-3", keys / "node-3.key")
    assert isinstance(node3.wait_connected(timeout=90), int)  # admitted by the running server, no restart


def test_add_node_without_a_running_server_says_what_registers_it(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=1).directory
    done = _fedshield("keys", "add-node", "--keys", str(keys), "--server-out", str(tmp_path / "no-run"))
    assert done.returncode == 0, done.stderr
    assert "`fedshield server` registers every key in authorized-nodes.txt when it starts" in done.stdout
    assert "flwr supernode register" not in done.stdout  # no command that would start a stray local SuperLink


def test_remove_node_names_the_known_nodes_for_an_unknown_name(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=2).directory
    done = _fedshield("keys", "remove-node", "node-9", "--keys", str(keys))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: no node named 'node-9' in {keys / 'authorized-nodes.txt'} (known: node-1, node-2); "
        "`fedshield keys remove-node` takes one of those names"]
