"""The local simulation backend's forked workers, each running the ClientApp one message at a time, the next queued.

Why its own module: the pool is forked as early as the simulating process can (right after the ClientApp is
imported, before Flower's simulation engine and the ServerApp are imported and built), so the workers warm up (the
imports a first training step makes: :data:`WARM_IMPORTS`) on the other cores while this process is still starting
the engine. Nothing here imports Flower's simulation engine; :mod:`fedshield.simulation.local_backend` plugs the
pool into it.

The pool is forked from the calling thread before any other thread of ours starts (a fork copies only the calling
thread, so no lock another thread holds can be copied locked), with the modules a ClientApp needs already imported.
Each worker: one message at a time with the next already queued in its socket (:data:`DEPTH`), torch limited to the
CPUs Ray would reserve for it, killed by the kernel if the simulating process dies (``PR_SET_PDEATHSIG``), gone
when the pipe closes. A ClientApp that raises leaves its worker serving; a worker that dies (a crash in native code,
the OOM killer) fails the message it was running with an error reply and is not replaced (the message queued
behind it never started, and runs on another worker): the run goes on with the others and fails every later
message once none is left, each reply naming the cause.
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..errors import FedshieldError
from ..flower_internals.serde import decode_context, decode_message, encode_context, encode_message
from .local_worker import ERROR, OK, WARM_IMPORTS, FrameReader, child_main, pair, send_frame, split_pair

__all__ = ["ClientAppRaised", "LocalPool", "PRELOAD", "PRELOAD_DP", "forked_pool", "pool_size", "server_threads"]

log = logging.getLogger(__name__)


class ClientAppRaised(Exception):
    """The ClientApp raised in a worker; the message is its ``"Type: text"`` (the backend hands it to Flower)."""


class _NeverRan(EOFError):
    """The worker died before it reached this request (an earlier one's reply never came): safe to run elsewhere."""


#: Imported once in the simulating process before forking, so no worker imports them again.
PRELOAD = ("torch", "fedshield.training", "fedshield.client.trainer", "fedshield.privacy.dpsgd")
#: Added when clients run DP-SGD: Opacus takes seconds to import (50 s measured under load 13 on 2 cores), so a run
#: without record-level DP does not pay for it.
PRELOAD_DP = ("opacus", "opacus.accountants")
_STOP_WAIT_S = 10.0


def pool_size(num_clients: int, cpus_per_client: float) -> int:
    """Ray's actor count (CPUs // CPUs per client), but never more workers than clients."""
    return max(1, min(num_clients, int(_cores() // cpus_per_client)))


#: Requests a worker holds at once: the one it runs and the next, already in its socket. Why: between two messages
#: a worker used to wait for this process to read its reply and send the next request, and this process is busy with
#: the ServerApp and the round's record, whose threads share one GIL: on 2 cores the workers sat idle for 40% of a
#: simulated round (issue 13). With the next request queued, the worker reads it as soon as its reply is sent.
DEPTH = 2


@dataclass
class _Worker:
    """One forked worker's end of the socket: requests go out in order, replies are read back in the same order."""

    pid: int
    conn: socket.socket
    #: Requests lent to this worker whose replies have not been read (the pool's lock guards it).
    lent: int = 0
    _sent: int = 0
    _read: int = 0
    _failed_at: int | None = None  # the first ticket whose reply could not be read
    _send_lock: threading.Lock = field(default_factory=threading.Lock)
    _turn: threading.Condition = field(default_factory=threading.Condition)
    _replies: FrameReader = field(init=False)

    def __post_init__(self) -> None:
        self._replies = FrameReader(self.conn)

    def send(self, request: bytes) -> int:
        """Send one request; its ticket (the order its reply comes back in)."""
        with self._send_lock:  # one frame at a time on the socket, tickets in the order the frames went out
            send_frame(self.conn, (request,))  # a closed socket raises OSError (EBADF), never reaches a reused fd
            self._sent += 1
            return self._sent - 1

    def receive(self, ticket: int) -> memoryview:
        """The reply to the request ``ticket``: wait for the earlier replies to be read, then read it.

        Raises :class:`_NeverRan` if an earlier reply could not be read: the worker runs its requests one after the
        other, so it ended before starting this one."""
        with self._turn:
            while self._read != ticket:
                self._turn.wait()
            if self._failed_at is not None:
                self._read += 1
                self._turn.notify_all()
                raise _NeverRan(f"worker {self.pid} ended before this request (request {self._failed_at} failed)")
        try:
            return self._replies.read()
        except BaseException:
            with self._turn:
                self._failed_at = ticket
            raise
        finally:  # the next caller's turn, whatever happened: it reads its reply, or learns it never ran
            with self._turn:
                self._read += 1
                self._turn.notify_all()

    def call(self, request: bytes) -> memoryview:
        """Send ``request``, then read its reply; :class:`_NeverRan` if the worker never got to it."""
        try:
            ticket = self.send(request)
        except OSError as exc:  # the worker is gone (or hung up on): it cannot have run this request
            raise _NeverRan(f"worker {self.pid} could not take the request: {exc!r}") from exc
        return self.receive(ticket)

    def hang_up(self) -> None:
        """Shut the socket down, then close it: a caller blocked on a reply wakes with end-of-file at once (closing
        alone leaves it blocked until the worker answers), and the worker sees end-of-file."""
        try:
            self.conn.shutdown(socket.SHUT_RDWR)
        except OSError:  # already closed, or the worker's end is gone
            pass
        self.conn.close()


class LocalPool:
    """N forked workers, each lent up to :data:`DEPTH` messages at once; :meth:`close` ends them (idempotent)."""

    def __init__(self, app: ClientApp, *, workers: int, threads: int, preload: tuple[str, ...] = PRELOAD,
                 warm: tuple[str, ...] = WARM_IMPORTS) -> None:
        self.app, self._warm = app, warm
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)  # notified when a worker can take one more request
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

    @property
    def slots(self) -> int:
        """Requests the pool takes at once (:data:`DEPTH` per worker): how many callers Flower's engine runs."""
        return self.size * DEPTH

    def has_idle(self) -> bool:
        with self._lock:
            return any(w.lent < DEPTH for w in self._alive.values())

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
        self._alive[pid] = _Worker(pid, parent_end)

    def run(self, message: Message, context: Context) -> tuple[Message, Context]:
        """Run the ClientApp on a worker (an idle one if there is one); raise :class:`ClientAppRaised` if it raised."""
        request = pair(encode_message(message, remember=True), encode_context(context))
        while True:
            worker = self._lend()
            try:
                reply = worker.call(request)
                break
            except _NeverRan as exc:  # queued behind a message that killed its worker: another worker runs it
                self._bury(worker, exc)
            except (EOFError, OSError) as exc:
                raise self._bury(worker, exc) from exc
            except BaseException as exc:  # a reply that could not be read (no memory for it): the socket's state
                self._bury(worker, exc)   # is unknown, so nothing more is sent to this worker
                raise
            finally:
                self._give_back(worker)
        if reply[:len(OK)] != OK:
            raise ClientAppRaised(bytes(reply[len(ERROR):]).decode(errors="replace"))
        message_bytes, context_bytes = split_pair(reply, len(OK))
        return decode_message(message_bytes), decode_context(context_bytes)

    def _lend(self) -> _Worker:
        """An idle worker if there is one, else the least loaded one with a free slot (waits for one)."""
        with self._free:
            while True:
                if self._closed:
                    raise FedshieldError("the local simulation workers were stopped with the run")
                if not self._alive:
                    raise FedshieldError(
                        "every local simulation worker has died (see the log above for each exit status); "
                        "rerun, or run with --backend ray to isolate clients in Ray actors"
                    )
                worker = min(self._alive.values(), key=lambda w: w.lent)
                if worker.lent < DEPTH:
                    worker.lent += 1
                    return worker
                self._free.wait(timeout=1.0)

    def _give_back(self, worker: _Worker) -> None:
        with self._free:
            worker.lent -= 1
            self._free.notify()

    def _bury(self, worker: _Worker, exc: BaseException) -> FedshieldError:
        with self._lock:
            buried = self._alive.pop(worker.pid, None) is None  # its other caller got there first
            closing = self._closed
            self._free.notify_all()  # a caller waiting for a slot re-checks what is left
        worker.hang_up()
        if closing:  # close() hung up on a worker in the middle of a message: the run is ending, not the worker
            return FedshieldError(f"the local worker {worker.pid} was stopped with the run ({exc!r})")
        if buried:
            return FedshieldError(f"the local worker {worker.pid} running this ClientApp died ({exc!r})")
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
            self._free.notify_all()
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
