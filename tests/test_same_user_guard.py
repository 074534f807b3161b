"""The same-user guard in front of Flower's local HTTP APIs (``fedshield.deploy.same_user``), piece by piece.

* the lookup it relies on: a client socket's owner, from the kernel (netlink ``sock_diag``) and from
  ``/proc/net/tcp*`` alike, ours and ``nobody``'s, IPv4 and IPv6, never a TIME_WAIT entry;
* a local user (``nobody``, a real process) naming the operator's own open connection in ``X-Forwarded-For``,
  against a real SuperLink: refused; and each of the two defences against that header, on its own.

The whole federation with ``nobody`` on both hosts is ``tests/test_local_users.py``.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import socket
import ssl
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import uvicorn
from _nobody import Nobody

from fedshield.crypto import KeySet
from fedshield.deploy import free_port
from fedshield.deploy.coordinator import ServerOptions, start_server
from fedshield.deploy.same_user import (
    SameUserOnly, _hex_address, _netlink_owner, _proc_owner, guard_create_app, loopback_connection, socket_owner,
)
from test_local_users import keys, nobody  # noqa: F401  (fixtures: the one-node key set, the local user)

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

FORWARDED_ATTACK = """
import http.client, ssl, sys
tls = ssl.create_default_context(cafile=sys.argv[2])
for value in sys.argv[3:]:
    conn = http.client.HTTPSConnection("127.0.0.1", int(sys.argv[1]), timeout=20, context=tls)
    conn.request("GET", "/fedshield-probe", headers={} if value == "-" else {"X-Forwarded-For": value})
    print(conn.getresponse().status, flush=True)
    conn.close()
"""



def test_socket_owner_is_the_uid_that_created_the_client_socket(nobody: Nobody) -> None:
    """The lookup the guard relies on: our own connection maps to us, nobody's to nobody, IPv4 and IPv6."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as server:
            server.bind((host, 0))
            server.listen()
            port = server.getsockname()[1]
            with socket.create_connection((host, port)) as own:
                conn, peer = server.accept()
                assert socket_owner(peer[:2], conn.getsockname()[:2]) == os.geteuid()
                assert socket_owner(own.getsockname()[:2], conn.getsockname()[:2]) == os.geteuid()
                conn.close()
            code = f"import socket, time; s = socket.create_connection(({host!r}, {port})); time.sleep(30)"
            intruder = nobody.start_python(code, log=nobody.home / "owner.out")
            try:
                conn, peer = server.accept()
                assert socket_owner(peer[:2], conn.getsockname()[:2]) == os.stat(nobody.home).st_uid
                conn.close()
            finally:
                intruder.kill()
                intruder.wait(timeout=30)
    assert socket_owner(("127.0.0.1", 1), ("127.0.0.1", 2)) is None  # no such connection: refused, not guessed


def test_the_kernel_lookup_agrees_with_the_proc_tables_and_ignores_time_wait() -> None:
    """socket_owner asks netlink sock_diag for the one socket (a hash lookup); /proc/net/tcp* is the fallback. Both
    must name the same owner, and neither may take a TIME_WAIT entry (its uid reads 0, root's) for a live caller."""
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as server:
            server.bind((host, 0))
            server.listen()
            client = socket.create_connection((host, server.getsockname()[1]))
            conn, peer = server.accept()
            ends = (peer[:2], conn.getsockname()[:2])
            assert _netlink_owner(*ends) == _proc_owner(*ends) == os.geteuid()
            client.close()  # the client closes first: its end goes to TIME_WAIT once the server closes too
            conn.close()
            deadline = time.monotonic() + 10
            while not _in_time_wait(*ends) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert _in_time_wait(*ends)  # the entry is there (uid 0), and neither lookup takes it
            assert _netlink_owner(*ends) is None and _proc_owner(*ends) is None


def _in_time_wait(client: tuple[str, int], server: tuple[str, int]) -> bool:
    local4, local6 = _hex_address(*client)
    remote4, remote6 = _hex_address(*server)
    rows = [line.split() for table in ("/proc/net/tcp", "/proc/net/tcp6") for line in Path(table).read_text().splitlines()[1:]]
    return any(r[1] in (local4, local6) and r[2] in (remote4, remote6) and r[3] == "06" for r in rows)


def test_a_forwarded_for_header_naming_the_operators_own_connection_is_refused(
    keys: KeySet, nobody: Nobody, tmp_path: Path
) -> None:
    """Flower's uvicorn trusts X-Forwarded-For from 127.0.0.1 and takes a port from it, so a local user who reads
    the port of the operator's open connection in /proc/net/tcp could pass as that connection. The real SuperLink
    (launched as fedshield launches it) must refuse such a request, and the operator's own still goes through."""
    control = free_port()
    server = start_server(ServerOptions(keys=keys.directory, fleet_address=f"127.0.0.1:{free_port()}",
                                        control_port=control), home=tmp_path / "superlink")
    try:
        tls = ssl.create_default_context(cafile=str(keys.ca_cert))
        operator = http.client.HTTPSConnection("127.0.0.1", control, timeout=20, context=tls)  # kept open: the bait

        def probe() -> int:
            operator.request("GET", "/fedshield-probe")
            response = operator.getresponse()
            response.read()
            return response.status

        assert probe() != 403  # the operator's own request reaches Flower (404: no such path)
        bait = f"127.0.0.1:{operator.sock.getsockname()[1]}"
        log = tmp_path / "forwarded.out"
        ca = nobody.give(keys.ca_cert, "ca.pem")
        done, kept = threading.Event(), []

        def keep_bait_open() -> None:  # within uvicorn's 5 s keep-alive, however slowly the attacker starts
            while not done.wait(1.0):
                kept.append(probe())

        keeper = threading.Thread(target=keep_bait_open)
        keeper.start()
        try:
            attack = nobody.start_python(FORWARDED_ATTACK, str(control), str(ca), bait, "-", "127.0.0.1", log=log)
            assert attack.wait(timeout=60) == 0, log.read_text()
        finally:
            done.set()
            keeper.join(timeout=30)
        assert probe() != 403 and 403 not in kept  # the bait stayed open and the operator's all along
        assert log.read_text().split() == ["403", "403", "403"], log.read_text()
        operator.close()
    finally:
        server.close()


def test_each_defence_against_proxy_headers_holds_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real-process test above passes with either defence alone; this one fails if either goes. The middleware
    refuses a proxy header even from a socket that is ours, and the launchers' guard makes uvicorn trust no proxy."""
    reached: list[dict] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        reached.append(scope)

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    with loopback_connection() as (client, server):
        guard = SameUserOnly(app)
        for headers in ([], [(b"x-forwarded-for", b"127.0.0.1:1")], [(b"X-Real-IP", b"127.0.0.1")]):
            asyncio.run(guard({"type": "http", "path": "/", "headers": headers, "client": client, "server": server},
                              None, send))
    assert len(reached) == 1 and not reached[0]["headers"]  # our own socket, no proxy header: admitted
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [403, 403]

    module = types.ModuleType("fedshield_fake_api")
    module.create_app = lambda: app  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "127.0.0.1")  # what uvicorn trusts by default
    guard_create_app(module.__name__)
    assert isinstance(module.create_app(), SameUserOnly)
    assert uvicorn.Config(module.create_app()).forwarded_allow_ips == ""
