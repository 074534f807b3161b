"""A pre-imported ``flwr-clientapp``: each ClientApp process is forked from a warm parent instead of started cold.

On by default (``FEDSHIELD_CLIENTAPP_ZYGOTE_ON=0`` on a site starts ClientApps cold; see
:mod:`fedshield.deploy.supernode_main`).

Flower 1.39's SuperExec starts ``flwr-clientapp`` by name for every message a SuperNode receives (SecAgg+: five
per site and round). A cold start spends ~1 s of CPU importing Flower and the app before it asks for its message,
and on a small machine several sites pay that at the same moment. Here the SuperNode launcher
(:mod:`fedshield.deploy.supernode_main`) forks a *zygote* before Flower starts any thread: it has
``flwr.supernode.cli.flwr_clientapp`` and the fedshield ClientApp imported and waits on a Unix socket. The
``flwr-clientapp`` that the SuperExec finds first on PATH is a tiny stdlib-only shim (:func:`write_shim`): it sends
its arguments, environment, working directory and standard streams (``SCM_RIGHTS``) to the zygote, which forks a
child that runs Flower's own ``flwr_clientapp()`` unchanged, and the shim exits with the child's exit code.

Process semantics are kept: one new process per message, as Flower expects; the shim lives exactly as long as its
child (the shim is what the SuperExec and our tests see, and killing it kills the child); the zygote dies with
the SuperNode. If the zygote cannot be reached the shim ``exec``s the real ``flwr-clientapp``: slower, never
broken.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..runtime_dirs import private_runtime_dir
from ..forked import exit_forked

__all__ = ["ZYGOTE_ENV", "Zygote", "write_shim"]

#: Environment variable through which the shim finds the zygote's socket.
ZYGOTE_ENV = "FEDSHIELD_CLIENTAPP_ZYGOTE"
_LENGTH_BYTES = 8
_MAX_REQUEST_BYTES = 4 * 2**20
_TICK_S = 0.1

_SHIM = '''#!{python} -S
# fedshield: flwr-clientapp forked from a pre-imported parent (fedshield.deploy.clientapp_zygote).
import json, os, socket, sys
REAL = {real!r}
def cold():
    os.execv(REAL, [REAL, *sys.argv[1:]])
path = os.environ.get({env!r}, "")
if not path:
    cold()
try:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    body = json.dumps({{"argv": sys.argv, "env": dict(os.environ), "cwd": os.getcwd()}}).encode()
    socket.send_fds(sock, [len(body).to_bytes({length}, "big")], [0, 1, 2])
    sock.sendall(body)
except OSError:
    cold()
status = b""
while len(status) < 4:
    chunk = sock.recv(4 - len(status))
    if not chunk:
        sys.exit(1)
    status += chunk
sys.exit(int.from_bytes(status, "big", signed=True))
'''


def write_shim(directory: Path, real_executable: str) -> Path:
    """Write the ``flwr-clientapp`` shim into ``directory`` (put it first on PATH); returns its path."""
    path = directory / "flwr-clientapp"
    path.write_text(
        _SHIM.format(python=sys.executable, real=real_executable, env=ZYGOTE_ENV, length=_LENGTH_BYTES),
        encoding="utf-8",
    )
    path.chmod(0o700)
    return path


class Zygote:
    """The forking server; :meth:`serve` runs in the process forked from the SuperNode launcher."""

    def __init__(self, entry: Callable[[], object] | None = None) -> None:
        #: What a child runs (default: Flower's ``flwr_clientapp``); tests pass their own.
        self.entry = entry
        self.directory = private_runtime_dir("fedshield-zygote-", socket_name="zygote.sock")  # 0700, the SuperNode's
        self.socket_path = str(self.directory / "zygote.sock")
        self.bin = self.directory / "bin"
        self.bin.mkdir(mode=0o700)

    def serve(self, parent_pid: int) -> None:
        """Fork one child per request until ``parent_pid`` (the SuperNode) is gone; never returns."""
        code = 0
        try:
            self._loop(parent_pid)
        except BaseException:  # a zygote that fails must not run the SuperNode's code: exit, shims fall back
            code = 1
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
            os._exit(code)

    def _loop(self, parent_pid: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the SuperNode, which then stops us
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.socket_path)
        os.chmod(self.socket_path, 0o600)
        server.listen(64)
        selector = selectors.DefaultSelector()
        selector.register(server, selectors.EVENT_READ)
        children: dict[int, socket.socket] = {}
        try:
            while os.getppid() == parent_pid:
                for key, _ in selector.select(timeout=_TICK_S):
                    if key.fileobj is server:
                        self._spawn(server, selector, children)
                    else:
                        self._shim_gone(key.fileobj, selector, children)  # type: ignore[arg-type]
                self._reap(selector, children)
        finally:
            for pid in children:
                _kill(pid)

    def _spawn(self, server: socket.socket, selector: selectors.BaseSelector, children: dict[int, socket.socket]) -> None:
        conn, _ = server.accept()
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError):
            conn.close()
            return
        pid = os.fork()
        if pid == 0:  # the ClientApp process: drop every descriptor of the zygote's
            selector.close()
            server.close()
            for other in children.values():
                other.close()
            _run_clientapp(request, fds, keep=conn, entry=self.entry)
        for fd in fds:
            os.close(fd)
        children[pid] = conn
        selector.register(conn, selectors.EVENT_READ, pid)

    def _shim_gone(self, conn: socket.socket, selector: selectors.BaseSelector, children: dict[int, socket.socket]) -> None:
        """The shim only ever reads: readable means it exited or was killed, so its child goes too."""
        pid = selector.get_key(conn).data
        _kill(pid)

    def _reap(self, selector: selectors.BaseSelector, children: dict[int, socket.socket]) -> None:
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = children.pop(pid, None)
            if conn is None:
                continue
            selector.unregister(conn)
            try:
                conn.sendall(os.waitstatus_to_exitcode(status).to_bytes(4, "big", signed=True))
            except OSError:
                pass
            conn.close()


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, _LENGTH_BYTES, 3)
    if len(head) != _LENGTH_BYTES or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError("malformed zygote request")
    size = int.from_bytes(head, "big")
    if size > _MAX_REQUEST_BYTES:
        raise ValueError("zygote request too large")
    body = b""
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("truncated zygote request")
        body += chunk
    request = json.loads(body)
    if not isinstance(request, dict) or not isinstance(request.get("argv"), list):
        raise ValueError("zygote request needs argv")
    return request, fds


def _run_clientapp(
    request: dict[str, Any], fds: list[int], *, keep: socket.socket, entry: Callable[[], object] | None
) -> None:
    """In the forked child: become the ``flwr-clientapp`` the shim was asked to be, then exit."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        keep.close()  # the zygote holds the connection to the shim; the child needs none
        sys.stdin = os.fdopen(0, "r", closefd=False)
        sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(request.get("env", {})).items()})
        os.chdir(str(request.get("cwd", ".")))
        sys.argv = [str(a) for a in request["argv"]]
        if entry is None:
            from fedshield.flower_internals.entry_points import flwr_clientapp

            entry = flwr_clientapp()
        entry()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        exit_forked(code)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
