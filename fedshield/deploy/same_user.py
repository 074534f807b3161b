"""Admit only this user's processes to Flower's local HTTP APIs (SuperLink Control + Runtime, SuperNode Runtime).

Why: Flower 1.39 serves the SuperLink's Control and Runtime APIs and the SuperNode's Runtime API over plain TCP
on 127.0.0.1 with no authentication of the caller (account login exists only through Flower's enterprise
plugins; the experimental ``--superexec-auth-secret-file`` signs only the SuperExec's ``PullPendingTasks``,
``AcquireTask`` and ``ClaimTask`` calls, and only with ``--isolation process``; it is ignored in subprocess mode).
Any local user could therefore register nodes, start runs (code that runs as the server's user) or pull a site's
tasks, SecAgg+ secrets included.

What: an ASGI middleware in front of Flower's FastAPI app that looks up the *client's* end of each TCP connection
(the kernel records the UID that created each socket) and answers 403 unless that UID is the server's own. The
lookup asks the kernel for that one socket over netlink (``sock_diag``, what ``ss`` uses: a hash lookup, ~0.1 ms);
where netlink is not available it scans ``/proc/net/tcp`` and ``/proc/net/tcp6``, which the kernel builds by
walking every TCP socket (~7 ms per request on a quiet host, in the server's event loop: issue 13 measured 25-190 ms
per SuperLink request during a SecAgg+ round). Every legitimate caller runs as the operator: the ``flwr`` CLI, the
SuperExec and ``flwr-serverapp``/``flwr-clientapp`` processes that Flower starts. A socket's owner is fixed when
it is created and cannot be chosen by an unprivileged process; root can bypass this, as it can read the server's
memory anyway. Connections whose owner cannot be found (another network namespace, a socket already closed) are
refused: the check fails closed.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

__all__ = ["SameUserOnly", "guard_create_app", "socket_owner"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
#: TCP states that cannot be a live client socket: LISTEN (0A) and TIME_WAIT (06, whose uid reads as 0).
_NOT_A_CLIENT = {"0A", "06"}
_REFUSAL = b"fedshield: this API admits only processes of the user that runs it\n"
_PROXY_HEADERS = {b"x-forwarded-for", b"forwarded", b"x-real-ip"}

log = logging.getLogger(__name__)


def _hex_address(host: str, port: int) -> tuple[str, str]:
    """``host:port`` as ``/proc/net/tcp`` and ``/proc/net/tcp6`` spell it (32-bit words in host byte order)."""
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    v6 = ip.packed if isinstance(ip, ipaddress.IPv6Address) else ipaddress.IPv6Address(f"::ffff:{ip}").packed
    v4 = f"{struct.unpack('=I', ip.packed)[0]:08X}" if isinstance(ip, ipaddress.IPv4Address) else ""
    words = "".join(f"{w:08X}" for w in struct.unpack("=4I", v6))
    return (f"{v4}:{port:04X}" if v4 else "", f"{words}:{port:04X}")


def socket_owner(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """UID that owns the socket at ``client`` connected to ``server`` on this host, or ``None`` if not found."""
    if _netlink_works():
        try:
            return _netlink_owner(client, server)
        except (OSError, ValueError, struct.error):  # one failed lookup: the /proc tables answer the same question
            return _proc_owner(client, server)
    return _proc_owner(client, server)  # no netlink here (a restricted sandbox)


_NETLINK_OK: list[bool] = []


@contextlib.contextmanager
def loopback_connection() -> Iterator[tuple[tuple[str, int], tuple[str, int]]]:
    """A live TCP connection of our own on 127.0.0.1: ``(client end, server end)`` addresses while it lasts."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            conn, _ = server.accept()
            with conn:
                yield client.getsockname()[:2], server.getsockname()[:2]


def _netlink_works() -> bool:
    """Whether netlink finds a loopback connection of our own (decided once per process, before serving: see
    :func:`guard_create_app`). A kernel without TCP sock_diag answers every lookup "no such socket", which would
    refuse every caller instead of falling back to /proc. A passing shortage (no file descriptor left) is not
    remembered: the next call tries again."""
    if not _NETLINK_OK:
        try:
            with loopback_connection() as (client, server):
                ok = _netlink_owner(client, server) == os.geteuid()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                return False
            ok = False
        except (ValueError, struct.error):
            ok = False
        _NETLINK_OK.append(ok)
    return _NETLINK_OK[0]


_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, _NLMSG_ERROR = 4, 20, 1, 2
_TCP_TIME_WAIT, _TCP_LISTEN = 6, 10
_NO_COOKIE = 0xFFFFFFFF


def _netlink_owner(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The kernel's answer for the one socket whose local end is ``client`` and remote end ``server``: its UID, or
    None if there is none (or it is only a TIME_WAIT / LISTEN entry, as in the /proc scan). Raises OSError if
    netlink cannot be used, ValueError on an address it cannot parse."""
    ips = [ipaddress.ip_address(host.split("%", 1)[0]) for host, _ in (client, server)]
    v4 = [ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip for ip in ips]
    lookups = []
    if all(isinstance(ip, ipaddress.IPv4Address) for ip in v4):
        lookups.append((socket.AF_INET, [ip.packed + bytes(12) for ip in v4]))  # an IPv4 socket
        ips = [ipaddress.IPv6Address(f"::ffff:{ip}") for ip in v4]  # or a dual-stack one with mapped addresses
    lookups.append((socket.AF_INET6, [ip.packed for ip in ips]))
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        for family, (src, dst) in lookups:
            if (uid := _diag_uid(nl, family, src, client[1], dst, server[1])) is not None:
                return uid
    return None


def _diag_uid(nl: socket.socket, family: int, src: bytes, sport: int, dst: bytes, dport: int) -> int | None:
    sockid = struct.pack("!HH", sport, dport) + src + dst + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    body = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid  # inet_diag_req_v2
    nl.send(struct.pack("=IHHII", 16 + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body)
    reply = nl.recv(65536)
    if len(reply) < 20 or struct.unpack_from("=I", reply)[0] > len(reply):
        raise OSError("short sock_diag reply")
    length, kind = struct.unpack_from("=IH", reply)
    if kind == _NLMSG_ERROR:
        (errno,) = struct.unpack_from("=i", reply, 16)
        if errno in (0, -2):  # ENOENT: no such socket
            return None
        raise OSError(-errno, "sock_diag lookup failed")
    if kind != _SOCK_DIAG_BY_FAMILY or length < 16 + 72:
        raise OSError("unexpected sock_diag reply")
    state = reply[17]
    (uid,) = struct.unpack_from("=I", reply, 16 + 64)  # inet_diag_msg: 4 bytes, sockid (48), 4 words, uid
    return None if state in (_TCP_TIME_WAIT, _TCP_LISTEN) else uid


def _proc_owner(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """:func:`socket_owner` from ``/proc/net/tcp`` and ``/proc/net/tcp6``."""
    try:
        local4, local6 = _hex_address(*client)
        remote4, remote6 = _hex_address(*server)
    except ValueError:
        return None
    for table, local, remote in zip(_TABLES, (local4, local6), (remote4, remote6)):
        if not local:
            continue
        try:
            with open(table, encoding="ascii") as lines:
                next(lines, None)  # header
                for line in lines:
                    fields = line.split()
                    if fields[1] == local and fields[2] == remote and fields[3] not in _NOT_A_CLIENT:
                        return int(fields[7])
        except OSError:
            continue
    return None


class SameUserOnly:
    """ASGI middleware: HTTP and WebSocket requests only from sockets owned by ``uid`` (default: this process's)."""

    def __init__(self, app: AsgiApp, *, uid: int | None = None) -> None:
        self.app = app
        self.uid = os.geteuid() if uid is None else uid
        self._logged: set[int | str | None] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)  # lifespan: Flower starts its gRPC servers and SuperExec here
            return
        client, server = scope.get("client"), scope.get("server")
        # uvicorn's proxy-header support (on in Flower's servers, trusting 127.0.0.1) rewrites the client address
        # from X-Forwarded-For, so a local user could name the port of the operator's own connection in it. No
        # Flower caller sends these headers: a request carrying one is refused (the launchers also turn that
        # support off: FORWARDED_ALLOW_IPS).
        if any(name.lower() in _PROXY_HEADERS for name, _ in scope.get("headers", ())):
            if "proxy" not in self._logged:
                self._logged.add("proxy")
                log.warning("fedshield: refused %s from %s: it carries a proxy header (X-Forwarded-For, Forwarded "
                            "or X-Real-IP), which no Flower caller sends", scope.get("path"), client)
            await _refuse(scope, send)
            return
        owner = socket_owner(tuple(client), tuple(server)) if client and server else None
        if owner == self.uid:
            await self.app(scope, receive, send)
            return
        if owner not in self._logged:  # once per foreign UID: a refused loop must not flood the log
            self._logged.add(owner)
            log.warning("fedshield: refused %s from %s (socket owner uid %s, not %s)",
                        scope.get("path"), client, owner, self.uid)  # fmt: skip
        await _refuse(scope, send)


async def _refuse(scope: Scope, send: Send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(_REFUSAL)).encode())]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": _REFUSAL})


def guard_create_app(module_name: str) -> None:
    """Wrap ``module_name.create_app`` so the app it returns is :class:`SameUserOnly`.

    Flower imports ``create_app`` inside the function that starts uvicorn (``flwr.superlink.main`` from
    ``_run_superlink_http_api``, ``flwr.supernode.main`` from ``_start_supernode_http_api``), so replacing the
    module attribute before that call guards the one server it builds. Raises ``RuntimeError`` if the module has
    no ``create_app``: starting an unguarded API would be worse than not starting.
    """
    os.environ["FORWARDED_ALLOW_IPS"] = ""  # uvicorn trusts no proxy: the client address is the socket's
    _netlink_works()  # decided before the first request, not inside the event loop on it
    module = importlib.import_module(module_name)
    create = getattr(module, "create_app", None)
    if not callable(create):
        raise RuntimeError(f"{module_name}.create_app is missing: this Flower version cannot be guarded")
    if getattr(create, "_fedshield_guarded", False):
        return

    def guarded(*args: Any, **kwargs: Any) -> SameUserOnly:
        return SameUserOnly(create(*args, **kwargs))

    guarded._fedshield_guarded = True  # type: ignore[attr-defined]
    module.create_app = guarded  # type: ignore[attr-defined]
