"""The warm worker: ``fedshield client`` trains here, in a process that stays up, for its short-lived ClientApps.

Flower 1.39 starts a new ``flwr-clientapp`` process for every message a SuperNode receives (SecAgg+ sends four per
round), and a ClientApp that trained itself would import torch and Opacus and load the site's data every time:
seconds per message, before any work. With a worker, the ClientApp (:mod:`fedshield.client.app`) imports only
Flower and numpy and hands the round to this worker, in which torch, Opacus and the site's data are already loaded.

The channel is a Unix socket in a directory of mode 0700 (``<state-dir>/worker``: only this user can even reach
the socket; a stale socket of a killed client is replaced, a live one refused), and
each connection's peer must run as this user (``SO_PEERCRED``). The worker serves the site described by *its own*
node config, never one named in a request, so whatever connects can at most ask it to do the site's normal work.
Each connection is read in its own thread (an idle or slow peer never blocks the others, and is dropped after
``_REQUEST_TIMEOUT_S``); requests are then served one at a time: the privacy ledger is charged in the same order
as the rounds arrive. Nothing a request raises, ``SystemExit`` included, stops the worker: it becomes an error
reply to the server and a line in this site's log.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import threading
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..runtime_dirs import MAX_SOCKET_PATH, private_runtime_dir
from .node_config import STATE_DIR
from .round_work import WORKER_ERROR_CODE, Refusal, run_evaluate, run_train
from .warm_worker_wire import ProtocolViolation, read_frame, write_frame

__all__ = ["ClientWorker"]

log = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.5
_REQUEST_TIMEOUT_S = 60.0  # a ClientApp sends its request at once; a peer that does not is dropped
_CLOSE_WAIT_S = 600.0  # how long close() waits for a request in progress


class ClientWorker:
    """Serve train and evaluate requests for one site on a Unix socket, from a background thread."""

    def __init__(self, node_config: Mapping[str, Any]) -> None:
        self.node_config = dict(node_config)
        self._directory = _socket_directory(self.node_config)
        self.socket_path = str(self._directory / "worker.sock")
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._handlers: set[threading.Thread] = set()
        self.served = 0

    def start(self) -> ClientWorker:
        _claim(Path(self.socket_path))
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            server.bind(self.socket_path)
            os.chmod(self.socket_path, 0o600)
            server.listen(8)
            server.settimeout(_ACCEPT_POLL_S)
        except OSError:
            server.close()
            self._remove_directory()
            raise
        self._server = server
        self._thread = threading.Thread(target=self._serve, name="fedshield-worker", daemon=True)
        self._thread.start()
        return self

    def warm_up(self) -> None:
        """Import what training needs now (torch, Opacus, the accountants) instead of in the first round."""
        import opacus  # noqa: F401

        from ..privacy import dpsgd  # noqa: F401  (torch)
        from ..privacy import ledger  # noqa: F401  (accountants)
        from . import trainer  # noqa: F401

    def close(self) -> None:
        """Stop accepting, wait for a request in progress, remove the socket and its directory."""
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=_CLOSE_WAIT_S)
        for handler in list(self._handlers):
            handler.join(timeout=_CLOSE_WAIT_S)
        if self._server is not None:
            self._server.close()
        self._remove_directory()

    def __enter__(self) -> ClientWorker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _remove_directory(self) -> None:
        shutil.rmtree(self._directory, ignore_errors=True)

    def _serve(self) -> None:
        server = self._server
        while server is not None and not self._closed.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closed.is_set():
                    return
                raise
            handler = threading.Thread(target=self._handle_and_close, args=(conn,), name="fedshield-worker-conn",
                                       daemon=True)
            self._handlers.add(handler)
            handler.start()

    def _handle_and_close(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._handle(conn)
        finally:
            self._handlers.discard(threading.current_thread())

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(_REQUEST_TIMEOUT_S)
        if not _same_user(conn):
            log.warning("worker: refused a connection from another user on %s", self.socket_path)
            return
        try:
            header, arrays = read_frame(conn)
        except (OSError, ProtocolViolation) as err:
            log.warning("worker: dropped a malformed request: %s", err)
            return
        conn.settimeout(None)  # the request is in; the reply is sent when the round is done
        with self._lock:
            if self._closed.is_set():
                return
            reply, out = self._dispatch(header, arrays)
            self.served += 1
        try:
            write_frame(conn, reply, out)
        except OSError as err:  # the ClientApp died (a killed site, a stopped run): nothing to answer
            log.warning("worker: could not send the reply: %s", err)

    def _dispatch(self, header: Mapping[str, Any], arrays: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        op, config = header.get("op"), header.get("config")
        try:
            if not isinstance(config, dict):
                raise Refusal(WORKER_ERROR_CODE, "fedshield:worker-error: the request has no round config")
            if op == "train":
                result = run_train(self.node_config, config, arrays)
                return {"ok": True, "metrics": result.metrics}, result.arrays
            if op == "evaluate":
                return {"ok": True, "metrics": run_evaluate(self.node_config, config, arrays)}, {}
            raise Refusal(WORKER_ERROR_CODE, f"fedshield:worker-error: unknown operation {op!r}")
        except Refusal as refusal:
            return {"ok": False, "code": refusal.code, "reason": refusal.reason}, {}
        except BaseException as exc:  # noqa: BLE001  nothing a request raises (SystemExit too) takes the site down
            log.error("worker: %s failed:\n%s", op, traceback.format_exc())
            reason = f"fedshield:worker-error: {type(exc).__name__}: {exc}"
            return {"ok": False, "code": WORKER_ERROR_CODE, "reason": reason}, {}


def _socket_directory(node_config: Mapping[str, Any]) -> Path:
    """``<state-dir>/worker`` (mode 0700): a site killed hard leaves nothing outside its own state directory.
    A fresh directory under the system temp dir when there is no state directory, or its path is too long for a
    Unix socket (108 bytes on Linux)."""
    state = str(node_config.get(STATE_DIR, "") or "")
    if state and len(str(Path(state) / "worker" / "worker.sock")) < MAX_SOCKET_PATH:
        directory = Path(state) / "worker"
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.chmod(0o700)
        return directory
    return private_runtime_dir("fedshield-worker-", socket_name="worker.sock")  # mode 0700


def _claim(socket_path: Path) -> None:
    """Remove the socket a killed client left behind; refuse if a live one still answers on it (two clients on one
    state directory would charge one privacy ledger from two processes)."""
    if not socket_path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(socket_path))
    except OSError:
        socket_path.unlink(missing_ok=True)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise ConfigError(
        f"another fedshield client is serving this state directory ({socket_path} answers): stop it, or give "
        "this client its own --state"
    )


def _same_user(conn: socket.socket) -> bool:
    peercred = getattr(socket, "SO_PEERCRED", None)
    if peercred is None:  # not Linux: the 0700 directory is the guard
        return True
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, peercred, struct.calcsize("3i")))
    return uid == os.getuid()
