"""``fedshield client`` without a federation: bad credentials, keys and data fail before connecting (one line, exit
code 2), an unreachable server is retried with backoff then named, a server from another CA or without TLS is named,
the node config is what the ClientApp reads, and a restarted site waits until the server noticed its crash."""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedshield.cli import cli
from fedshield.deploy import site as client_deployment
from fedshield.protocol import NODE_HEARTBEAT_S
from fedshield.crypto import KeySet, init_keys
from fedshield.deploy import free_port
from _deploy_cli_inputs import one_error_line, runner
from _deploy_cli_inputs import keys, site_csv  # noqa: F401  (module-scoped pytest fixtures)


# ------------------------------------------------------------------------------------------------ client bad input


def _client(keys: KeySet, data: Path, state: Path, *args: str, server: str | None = None) -> list[str]:
    node = keys.node("node-1")
    return ["client", "--server", server or f"127.0.0.1:{free_port()}", "--ca", str(keys.ca_cert),
            "--node-key", str(node.private_key_path), "--roster", str(keys.authorized_nodes), "--data", str(data),
            "--state", str(state),
            "--connect-attempts", "2", "--retry-wait", "0.05", *args]


def _copy(src: Path, dst: Path, mode: int) -> Path:
    dst.write_bytes(src.read_bytes())
    os.chmod(dst, mode)
    return dst


def test_client_bad_credentials_fail_before_connecting(keys: KeySet, site_csv: Path, tmp_path: Path) -> None:
    key = keys.node("node-1").private_key_path
    assert key is not None
    cases = {
        "missing key": (["--node-key", str(tmp_path / "absent.key")], "Missing node private key"),
        "open key": (["--node-key", str(_copy(key, tmp_path / "open.key", 0o644))], "readable by other users"),
        "not a CA": (["--ca", str(_copy(site_csv, tmp_path / "ca.pem", 0o644))], "is not a PEM certificate"),
        "server key as node key": (["--node-key", str(keys.server_key)], "not an unencrypted OpenSSH private key"),
        "insecure with keys": (["--insecure"], "drop --ca and --node-key"),
        "bad budget": (["--max-epsilon", "0"], "--max-epsilon must be a finite number > 0"),
        "delta not below 1/records": (["--delta", "0.5"], "--delta 0.5 is not below 1/records"),
        "unknown accountant": (["--accountant", "gdp"], "--accountant must be one of"),
        "missing policy file": (["--policy", str(tmp_path / "none.toml")], "cannot read the site policy"),
        "absent roster": (["--roster", str(tmp_path / "absent.txt")], "cannot read the SecAgg+ roster"),
        "no secagg peers": (["--secagg-min-peers", "0"], "--secagg-min-peers must be >= 1"),
    }
    for name, (extra, expected) in cases.items():
        result = runner.invoke(cli, [*_client(keys, site_csv, tmp_path / "state"), *extra])
        assert result.exit_code == 2, (name, result.output)
        assert expected in one_error_line(result.output), name


def test_client_unreadable_key(keys: KeySet, site_csv: Path, tmp_path: Path) -> None:
    key = keys.node("node-1").private_key_path
    assert key is not None
    locked = _copy(key, tmp_path / "locked.key", 0o000)
    if os.access(locked, os.R_OK):
        pytest.skip("running as root: file modes do not stop reads")
    result = runner.invoke(cli, [*_client(keys, site_csv, tmp_path / "state"), "--node-key", str(locked)])
    assert result.exit_code == 2 and "Cannot read node private key" in one_error_line(result.output)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("p0,p1,label\n1,2,3\n4,5,6\n", "has 2 feature columns, task 'digits' expects 64"),
        (",".join([f"p{i}" for i in range(64)] + ["label"]) + "\n" + ",".join(["x"] * 65) + "\n"
         + ",".join(["1"] * 65) + "\n", "is not numeric"),
        (",".join([f"p{i}" for i in range(64)] + ["y"]) + "\n" + ",".join(["1"] * 65) + "\n", "has no label column 'label'"),
    ],
)
def test_client_malformed_data_fails_before_connecting(
    keys: KeySet, tmp_path: Path, content: str, expected: str
) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    result = runner.invoke(cli, _client(keys, bad, tmp_path / "state"))
    assert result.exit_code == 2, result.output
    assert expected in one_error_line(result.output)


def test_an_unreachable_server_is_retried_with_backoff_then_named(
    keys: KeySet, site_csv: Path, tmp_path: Path
) -> None:
    port = free_port()  # nothing listens here
    proc = subprocess.run(
        [sys.executable, "-m", "fedshield", *_client(keys, site_csv, tmp_path / "state", server=f"127.0.0.1:{port}")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot reach the server at 127.0.0.1:{port} after 2 attempts (Connection refused): check the "
        "address, the firewall, and that `fedshield server` is running"
    ]
    assert "attempt 1/2" in proc.stdout  # the retry was announced
    assert not (tmp_path / "state" / "supernode.log").exists(), "no SuperNode may start before the server answers"


def test_backoff_doubles_up_to_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    monkeypatch.setattr(client_deployment.time, "sleep", waits.append)
    port = free_port()
    with pytest.raises(client_deployment.DeploymentError, match="after 5 attempts"):
        client_deployment.wait_for_server("127.0.0.1", port, ca_cert=None, attempts=5, retry_wait=1.0,
                                          max_retry_wait=5.0)
    assert waits == [1.0, 2.0, 4.0, 5.0]


@pytest.fixture
def tls_listener(keys: KeySet, tmp_path: Path) -> Iterator[tuple[int, KeySet]]:
    """A TLS server on 127.0.0.1 with a certificate from *another* CA than ``keys``."""
    other = init_keys(tmp_path / "other", server_hosts=["127.0.0.1"], nodes=0)
    yield from _listener(other)


@pytest.fixture
def plain_listener() -> Iterator[tuple[int, None]]:
    yield from _listener(None)


def _listener(tls: KeySet | None) -> Iterator[tuple[int, KeySet | None]]:
    context = None
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.server_cert, tls.server_key)
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            try:
                if context is not None:
                    with context.wrap_socket(conn, server_side=True):
                        pass
                else:
                    conn.sendall(b"\x00\x00\x12\x04not tls")  # like a plaintext HTTP/2 server's first bytes
                    conn.close()
            except (ssl.SSLError, OSError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], tls
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


def test_a_server_certificate_from_another_ca_is_named(
    keys: KeySet, site_csv: Path, tmp_path: Path, tls_listener: tuple[int, KeySet]
) -> None:
    port, _ = tls_listener
    result = runner.invoke(cli, _client(keys, site_csv, tmp_path / "state", server=f"127.0.0.1:{port}"))
    assert result.exit_code == 2, result.output
    line = one_error_line(result.output)
    assert "is not signed by the CA in" in line and "same `fedshield keys init` directory" in line


def test_a_server_without_tls_is_named(
    keys: KeySet, site_csv: Path, tmp_path: Path, plain_listener: tuple[int, None]
) -> None:
    port, _ = plain_listener
    result = runner.invoke(cli, _client(keys, site_csv, tmp_path / "state", server=f"127.0.0.1:{port}"))
    assert result.exit_code == 2, result.output
    assert "did not complete a TLS handshake" in one_error_line(result.output)


def test_client_node_config_is_what_the_clientapp_reads(keys: KeySet, site_csv: Path, tmp_path: Path) -> None:
    node = keys.node("node-1")
    options = client_deployment.ClientOptions(
        server="127.0.0.1:9092", data=site_csv, state_dir=tmp_path / "state", ca_cert=keys.ca_cert,
        node_key=node.private_key_path, max_epsilon=5.0, allow_plain_updates=True, roster=keys.authorized_nodes,
    )
    check = client_deployment.check_client(options)
    assert check.node_config == {
        "data-path": str(site_csv.resolve()), "state-dir": str((tmp_path / "state").resolve()), "label-column": "",
        "max-epsilon": 5.0, "allow-plain-updates": True, "secagg-roster": str(keys.authorized_nodes.resolve()),
        "secagg-min-peers": 2, "node-key": str(node.private_key_path.resolve()),
        # the site's own policy: its task, its delta (min(1e-5, 1/100 records)), its accountant, DP required
        "task": "digits", "delta": 1e-5, "accountant": "prv", "allow-no-dp": False, "min-honest": 0,
    }
    assert (check.train_examples, check.test_examples) == (80, 20)
    assert (tmp_path / "state" / "split.json").is_file(), "the site chose its own split on first start"


def test_a_restarted_site_waits_until_the_server_has_noticed_its_crash(
    keys: KeySet, site_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower 1.39 refuses to activate a node it still counts online (code 2004) for up to 60 s after a crash,
    and activating the moment it would accept could strand the round's open message to the old process. A state
    directory whose node was connected before therefore waits once, then connects; a new one fails at once."""
    refusal = "the SuperLink does not know this node's key (code 2004); ..."
    node = object()  # stands for the connected SuperNode
    attempts: list[str] = []

    def fake_connect(config: object, timeout: float) -> object:
        attempts.append("try")
        if len(attempts) == 1:
            raise client_deployment._Refused(refusal)
        return node

    sleeps: list[float] = []
    monkeypatch.setattr(client_deployment, "_connect", fake_connect)
    monkeypatch.setattr(client_deployment, "wait_for_server", lambda *a, **k: 1)
    monkeypatch.setattr(client_deployment.time, "sleep", sleeps.append)
    options = client_deployment.ClientOptions(
        server="127.0.0.1:9092", data=site_csv, state_dir=tmp_path / "restarted", ca_cert=keys.ca_cert,
        node_key=keys.node("node-1").private_key_path, roster=keys.authorized_nodes,
    )
    (tmp_path / "restarted").mkdir()
    (tmp_path / "restarted" / "supernode.log").write_text("INFO :      SuperNode ID: 1234\n")
    client = client_deployment.start_client(options)
    assert client.supernode is node and len(attempts) == 2 and sleeps == [2 * NODE_HEARTBEAT_S + 6]

    attempts.clear()
    fresh = dataclasses.replace(options, state_dir=tmp_path / "fresh")
    with pytest.raises(client_deployment.DeploymentError, match=r"did not accept this client: .*code 2004"):
        client_deployment.start_client(fresh)
    assert len(attempts) == 1 and sleeps == [2 * NODE_HEARTBEAT_S + 6]
