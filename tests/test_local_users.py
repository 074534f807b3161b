"""A local user on the server host or on a site host (``nobody``, real processes) gets nothing from Flower's APIs.

One real federation (``fedshield server`` with TLS and node authentication, one ``fedshield client``):

* on the server host, ``nobody`` holding the world-readable ``ca.pem`` runs Flower's own ``flwr`` CLI against the
  SuperLink's Control API on 127.0.0.1: ``supernode list``, ``supernode register`` of its own key and ``run`` of
  its own app are all refused, while the operator's ``flwr supernode list`` still answers;
* on the site host, ``nobody`` loops on the SuperNode's Runtime API (``AcquireTask`` with Flower's own HTTP client,
  what a SuperExec does) for the whole round: every call is refused, no task is acquired, and the site's real
  ClientApp trains and answers (the round completes with 1/1 trained).

Then the no-orphans check: mid-run, the server's processes listen only on the Fleet port and the loopback HTTP
port, the site's only on its loopback Runtime port; ``fedshield server`` and ``fedshield client`` SIGKILLed (no
cleanup can run) take every Flower process they started with them, and the ports are free again.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _listeners import listeners
from _nobody import Nobody
from _processes import Cli, alive, digits_sites
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedshield.crypto import KeySet, init_keys
from fedshield.deploy import free_port
from fedshield.deploy.connection import FlwrConnection
from fedshield.deploy.process import live_descendants

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

# What a SuperExec does (flwr/supercore/superexec/run_superexec.py), in a loop, as nobody: ask the SuperNode's
# Runtime API for a task. Prints one line per attempt: the task's token if one was handed out, else the error.
SITE_ATTACK = """
import sys, time
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.runtime import RuntimeHttpClient
client = RuntimeHttpClient.from_server_address(server_address=sys.argv[1], insecure=True, root_certificates=None,
                                               interceptors=[])
while True:
    try:
        res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[str(t) for t in TaskType]))
        print("ACQUIRED" if res.token else "ANSWERED-EMPTY", flush=True)
    except Exception as err:
        print("ERROR", type(err).__name__, str(err).replace(chr(10), " ")[:300], flush=True)
    time.sleep(0.05)
"""

# The attacker's own app: were its run accepted, its ServerApp would run as the server's user and write `marker`.
#: As nobody: connect to the site's ClientApp zygote socket, which forks ClientApps as the site's user.
ZYGOTE_ATTACK = """
import socket, sys
try:
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(sys.argv[1])
    print("CONNECTED")
except OSError as exc:
    print(type(exc).__name__, exc.errno)
"""


def _zygote_socket(pid: int) -> str | None:
    """The zygote socket path the site's SuperNode hands its ClientApp shims (``FEDSHIELD_CLIENTAPP_ZYGOTE``)."""
    for p in [pid, *live_descendants(pid)]:
        try:
            environ = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"FEDSHIELD_CLIENTAPP_ZYGOTE="):
                return entry.split(b"=", 1)[1].decode()
    return None


#: As nobody: GET the SuperLink's Control API (TLS, CA in argv[2]) with each X-Forwarded-For value in argv[3:] ("-":
#: no header); prints one status per request (403 is the guard's refusal; anything else reached Flower).
EVIL_APP = """
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
client = ClientApp()
server = ServerApp()

@server.main()
def main(grid, context):
    open({marker!r}, "w").write("owned")
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return init_keys(tmp_path_factory.mktemp("keys") / "keys", server_hosts=["127.0.0.1"], nodes=1)


@pytest.fixture
def nobody() -> Iterator[Nobody]:
    user = Nobody.create()
    yield user
    user.remove()


def _attacker_key(nobody: Nobody) -> Path:
    key = ec.generate_private_key(ec.SECP384R1())
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path = nobody.home / "attacker.pub"
    path.write_bytes(pub + b"\n")
    nobody._own(path)
    return path


def _server_args(keys: KeySet, fleet: str, control: int, out: Path, rounds: int) -> list[str]:
    return ["server", "--keys", str(keys.directory), "--address", fleet, "--control-port", str(control),
            "--rounds", str(rounds), "--min-clients", "1", "--no-secagg", "--no-dp", "--fraction-evaluate", "0",
            "--out", str(out), "--seed", "3"]  # fmt: skip


def _client_args(keys: KeySet, fleet: str, data: Path, state: Path, port: int) -> list[str]:
    return ["client", "--server", fleet, "--ca", str(keys.ca_cert), "--node-key",
            str(keys.node("node-1").private_key_path), "--data", str(data), "--state", str(state),
            "--allow-plain-updates", "--port", str(port), "--roster", str(keys.authorized_nodes),
            # the server runs --no-dp here (the round only has to complete): this site accepts that on purpose
            "--allow-no-dp"]  # fmt: skip


def _operator_connection(out: Path) -> FlwrConnection:
    (home,) = [p.parent for p in out.rglob("flwr-cli/config.toml")]
    text = (home / "config.toml").read_text()
    address = text.split('address = "', 1)[1].split('"', 1)[0]
    ca = Path(text.split('root-certificates = "', 1)[1].split('"', 1)[0])
    return FlwrConnection("fedshield", address, home, root_certificates=ca)


def test_a_local_user_is_refused_by_the_superlink_and_the_supernode_while_a_round_completes(
    keys: KeySet, nobody: Nobody, tmp_path: Path
) -> None:
    fleet, control, runtime = f"127.0.0.1:{free_port()}", free_port(), free_port()
    out = tmp_path / "run"
    (data,) = digits_sites(tmp_path, 1)
    ca = nobody.give(keys.ca_cert, "ca.pem")
    conn = nobody.connect(f"127.0.0.1:{control}", ca)
    app = nobody.home / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n[project]\nname = "evil"\n'
        'version = "1.0.0"\ndependencies = []\n[tool.flwr.app]\npublisher = "evil"\n'
        '[tool.flwr.app.components]\nserverapp = "evil:server"\nclientapp = "evil:client"\n'
    )
    marker = tmp_path / "written-by-the-attackers-serverapp"
    (app / "evil.py").write_text(EVIL_APP.format(marker=str(marker)))
    for path in [app, *app.iterdir()]:
        nobody._own(path)
    attacker_pub = _attacker_key(nobody)
    started: list[Cli] = []
    site_attack = None
    try:
        server = Cli.start(_server_args(keys, fleet, control, out, rounds=1), tmp_path / "server.out")
        started.append(server)
        server.wait_for(r"registered nodes: node-1", timeout=120)

        # The server host: Flower's own CLI, as nobody, against the SuperLink's Control API.
        attempts = {
            "list-nodes": nobody.flwr("supernode", "list", conn, "--format", "json"),
            "register-node": nobody.flwr("supernode", "register", str(attacker_pub), conn, "--format", "json"),
            "list-runs": nobody.flwr("ls", conn, "--format", "json"),
            "start-run": nobody.flwr("run", str(app), conn, "--format", "json"),
        }
        for what, done in attempts.items():
            said = done.stdout + done.stderr
            # `flwr --format json` exits 0 and says "success": false with the HTTP status
            assert '"success": true' not in said and "403 Forbidden" in said, f"{what} was not refused:\n{said}"
        operator = _operator_connection(out)
        nodes = operator.run_json(["supernode", "list", operator.name])["nodes"]
        assert len(nodes) == 1, nodes  # the operator's own call works, and the attacker's key is not there

        # The site host: nobody polls the SuperNode's Runtime API from before it starts until the round is over.
        site_attack = nobody.start_python(SITE_ATTACK, f"127.0.0.1:{runtime}", log=tmp_path / "site-attack.out")
        client = Cli.start(_client_args(keys, fleet, data, tmp_path / "state", runtime), tmp_path / "client.out")
        started.append(client)
        client.wait_for(r"as node (\d+)", timeout=120)
        assert server.proc.wait(timeout=300) == 0, server.text()
        # The zygote (on by default) forks ClientApps as the site's user: nobody cannot even reach its socket.
        zygote = _zygote_socket(client.proc.pid)
        assert zygote is not None and Path(zygote).is_socket(), "the site runs without its ClientApp zygote"
        probe = nobody.start_python(ZYGOTE_ATTACK, zygote, log=tmp_path / "zygote-attack.out")
        probe.wait(timeout=60)
        assert client.interrupt() == 130, client.text()
    finally:
        if site_attack is not None:
            site_attack.kill()
            site_attack.wait(timeout=30)
        for cli in started:
            cli.interrupt()

    text = server.text()
    assert "trained 1/1" in text and "finished:completed" in text, text
    assert not marker.exists()
    attack = (tmp_path / "site-attack.out").read_text()
    tries = attack.splitlines()
    assert "ACQUIRED" not in attack and "ANSWERED-EMPTY" not in attack, attack[-2000:]
    zygote_attack = (tmp_path / "zygote-attack.out").read_text()
    assert zygote_attack.strip() == "PermissionError 13", zygote_attack  # EACCES: the 0700 directory stops it
    refused = [line for line in tries if "403" in line or "Forbidden" in line]
    assert len(refused) >= 10, attack[-2000:]  # it kept trying through the round, refused every time
    superlink_log = "".join(p.read_text(errors="replace") for p in out.rglob("superlink.log"))
    supernode_log = "".join(p.read_text(errors="replace") for p in (tmp_path / "state").rglob("*.log"))
    uid = f"uid {os.stat(nobody.home).st_uid}"
    assert "fedshield: refused" in superlink_log and uid in superlink_log
    assert "fedshield: refused" in supernode_log and uid in supernode_log


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _flower_tree(pid: int) -> dict[int, str]:
    found = {}
    for p in live_descendants(pid):
        try:
            found[p] = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
    return found


def test_sigkilled_server_and_client_leave_no_flower_process_and_free_ports(keys: KeySet, tmp_path: Path) -> None:
    fleet_port, control, runtime = free_port(), free_port(), free_port()
    fleet = f"127.0.0.1:{fleet_port}"
    (data,) = digits_sites(tmp_path, 1)
    server = Cli.start(_server_args(keys, fleet, control, tmp_path / "run", rounds=50), tmp_path / "server.out")
    client = None
    tree: dict[int, str] = {}
    try:
        server.wait_for(r"registered nodes: node-1", timeout=120)
        client = Cli.start(_client_args(keys, fleet, data, tmp_path / "state", runtime), tmp_path / "client.out")
        server.wait_for(r"round\s+1/50", timeout=180)  # a ServerApp and ClientApps have run: the full tree exists
        tree = {**_flower_tree(server.proc.pid), **_flower_tree(client.proc.pid)}
        names = " ".join(tree.values())
        assert "superlink_main" in names and "flwr-serverapp" in names and "supernode_main" in names, tree
        # What listens: the Fleet API where it was asked, the HTTP APIs on loopback, nothing else on either host.
        # /proc is read while the processes run, so one look can miss a socket; a few looks cannot miss a listener
        # that stays, and an extra one that stays still fails.
        expected = ({fleet, f"127.0.0.1:{control}"}, {f"127.0.0.1:{runtime}"})
        deadline = time.monotonic() + 15
        while True:
            server_side = listeners([server.proc.pid, *live_descendants(server.proc.pid)])
            site_side = listeners([client.proc.pid, *live_descendants(client.proc.pid)])
            if (set(server_side), set(site_side)) == expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert set(server_side) == expected[0], server_side
        assert set(site_side) == expected[1], site_side
        for cli in (server, client):
            os.kill(cli.proc.pid, signal.SIGKILL)  # only the CLI process: what it started must follow by itself
            cli.proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while (left := {p: c for p, c in tree.items() if alive(p)}) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"orphans after SIGKILL: {left}"
        assert all(_port_free(p) for p in (fleet_port, control, runtime))
    finally:
        for cli in (server, client):
            if cli is not None and cli.proc.poll() is None:
                cli.kill()
        for pid in tree:  # a failed run must not leave its orphans behind either
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
