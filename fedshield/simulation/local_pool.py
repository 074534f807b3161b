"""The local simulation backend's pool of forked workers, each running the ClientApp for one message at a time.

Why its own module: the pool is forked as early as the simulating process can (right after the ClientApp is
imported, before Flower's simulation engine and the ServerApp are imported and built), so the workers warm up (the
imports a first training step makes: :data:`WARM_IMPORTS`) on the other cores while this process is still starting
the engine. Nothing here imports Flower's simulation engine; :mod:`fedshield.simulation.local_backend` plugs the
pool into it.

The pool is forked from the calling thread before any other thread of ours starts (a fork copies only the calling
thread, so no lock another thread holds can be copied locked), with the modules a ClientApp needs already imported.
Each worker: one message at a time, torch limited to the CPUs Ray would reserve for it, killed by the kernel if the
simulating process dies (``PR_SET_PDEATHSIG``), gone when the pipe closes. A ClientApp that raises leaves its worker
serving; a worker that dies (a crash in native code, the OOM killer) fails the message it held with an error reply
and is not replaced: the run goes on with the others and fails every later message once none is left, each reply
naming the cause.
"""

from __future__ import annotations

import importlib
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..errors import FedshieldError
from ..flower_internals.serde import decode_context, decode_message, encode_context, encode_message
from .local_worker import ERROR, OK, WARM_IMPORTS, child_main, pair, recv_frame, send_frame, split_pair

__all__ = ["ClientAppRaised", "LocalPool", "PRELOAD", "PRELOAD_DP", "forked_pool", "pool_size", "server_threads"]

log = logging.getLogger(__name__)


class ClientAppRaised(Exception):
    """The ClientApp raised in a worker; the message is its ``"Type: text"`` (the backend hands it to Flower)."""


#: Imported once in the simulating process before forking, so no worker imports them again.
PRELOAD = ("torch", "fedshield.training", "fedshield.client.trainer", "fedshield.privacy.dpsgd")
#: Added when clients run DP-SGD: Opacus takes seconds to import (50 s measured under load 13 on 2 cores), so a run
#: without record-level DP does not pay for it.
PRELOAD_DP = ("opacus", "opacus.accountants")
_STOP_WAIT_S = 10.0


def pool_size(num_clients: int, cpus_per_client: float) -> int:
    """Ray's actor count (CPUs // CPUs per client), but never more workers than clients."""
    return max(1, min(num_clients, int(_cores() // cpus_per_client)))


@dataclass
class _Worker:
    pid: int
    conn: socket.socket

    def call(self, request: bytes) -> memoryview:
        send_frame(self.conn, (request,))  # a closed socket raises OSError (EBADF), never reaches a reused fd
        return recv_frame(self.conn)

    def hang_up(self) -> None:
        """Shut the socket down, then close it: a caller blocked on a reply wakes with end-of-file at once (closing
        alone leaves it blocked until the worker answers), and the worker sees end-of-file."""
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed, or the worker's end is gone
            pass
        self.conn.close()


class LocalPool:
    """N forked workers lent out one message at a time; :meth:`close` ends them (idempotent)."""

    def __init__(self, app: ClientApp, *, workers: int, threads: int, preload: tuple[str, ...] = PRELOAD,
                 warm: tuple[str, ...] = WARM_IMPORTS) -> None:
        self.app, self._warm = app, warm
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()
        self._alive: dict[int, _Worker] = {}
        self._closed = False
        for module in preload:
            importlib.import_module(module)
        for _ in range(workers):
            self._fork(threads)

    @property
    def size(self) -> int:
        return len(self._alive)

    def pids(self) -> list[int]:
        return sorted(self._alive)

    def has_idle(self) -> bool:
        return not self._idle.empty()

    def _fork(self, threads: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for end in (parent_end, child_end):  # blocking whatever socket.setdefaulttimeout() an imported module set
            end.setblocking(True)
        others = [w.conn for w in self._alive.values()] + [parent_end]
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            child_main(child_end, self.app, threads=threads, parent_pid=parent, close=others, warm=self._warm)
        child_end.close()
        worker = _Worker(pid, parent_end)
        self._alive[pid] = worker
        self._idle.put(worker)

    def run(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on one idle worker; raise :class:`ClientAppRaised` if it raised."""
        request = pair(encode_message(message, remember=True), encode_context(context))
        worker = self._lend()
        try:
            reply = worker.call(request)
        except (EOFError, OSError) as exc:
            raise self._bury(worker, exc) from exc
        self._idle.put(worker)
        if reply[:len(OK)] != OK:
            raise ClientAppRaised(bytes(reply[len(ERROR):]).decode(errors="replace"))
        message_bytes, context_bytes = split_pair(reply, len(OK))
        return decode_message(message_bytes), decode_context(context_bytes)

    def _lend(self) -> _Worker:
        while True:
            try:
                return self._idle.get(timeout=1.0)
            except queue.Empty:
                if not self._alive or self._closed:
                    raise FedshieldError(
                        "every local simulation worker has died (see the log above for each exit status); "
                        "rerun, or run with --backend ray to isolate clients in Ray actors"
                    ) from None

    def _bury(self, worker: _Worker, exc: BaseException) -> FedshieldError:
        with self._lock:
            self._alive.pop(worker.pid, None)
            closing = self._closed
        worker.hang_up()
        if closing:  # close() hung up on a worker in the middle of a message: the run is ending, not the worker
            return FedshieldError(f"the local worker {worker.pid} was stopped with the run ({exc!r})")
        status = _reap(worker.pid, wait_s=1.0)
        log.error("local simulation worker %d died (%s) while running a ClientApp; %d workers remain",
                  worker.pid, status, len(self._alive))
        return FedshieldError(f"the local worker {worker.pid} running this ClientApp died ({status}: {exc!r}); "
                              f"the run goes on with {len(self._alive)} workers")

    def close(self) -> None:
        """Hang up on every worker (a waiting one exits at once), wait a bounded time, then SIGKILL what is left."""
        with self._lock:
            self._closed = True
            workers, self._alive = list(self._alive.values()), {}
        for worker in workers:
            worker.hang_up()
        deadline = time.monotonic() + _STOP_WAIT_S
        for worker in workers:
            _reap(worker.pid, wait_s=max(0.0, deadline - time.monotonic()))


def _reap(pid: int, *, wait_s: float) -> str:
    """Wait up to ``wait_s`` for ``pid`` to exit, SIGKILL it after that; its exit status in words."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return "already reaped"
        if done:
            return _describe(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            return _describe(os.waitpid(pid, 0)[1]) + " after SIGKILL"
        time.sleep(0.02)


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


@contextmanager
def forked_pool(app: ClientApp, *, num_clients: int, cpus_per_client: float = 1.0, dp_sgd: bool = True
                ) -> Iterator[LocalPool]:
    """A pool of workers for ``app``, forked now and ended with the block.

    Enter it in the thread that will run the simulation, before any other thread of ours starts (see the module
    docstring). ``dp_sgd``: the clients run DP-SGD, so Opacus is imported before forking too.
    """
    threads = max(1, int(cpus_per_client))
    pool = LocalPool(app, workers=pool_size(num_clients, cpus_per_client), threads=threads,
                     preload=PRELOAD + (PRELOAD_DP if dp_sgd else ()), warm=WARM_IMPORTS if dp_sgd else ())
    import torch  # imported by PRELOAD already

    before = torch.get_num_threads()
    torch.set_num_threads(server_threads(pool.size * threads))
    try:
        yield pool
    finally:
        torch.set_num_threads(before)
        pool.close()


def server_threads(reserved: int) -> int:
    """The torch threads of the simulating process (the ServerApp's evaluation): the cores the workers do not
    reserve, at least one.

    Why: torch's default is one thread per core, so on a machine whose cores the workers fill, the server's
    evaluation ran a second thread that competed with them and, between its parallel regions, spun; measured on
    2 cores, 13 ms of CPU per round, a fifth of the workers' (issue 13).
    """
    return max(1, _cores() - reserved)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
