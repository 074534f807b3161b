"""One worker of the local simulation backend: a forked process that runs the ClientApp for one message at a time.

Why a forked process and not Ray's actor: the worker is a copy of the simulating process made before Flower's
engine starts, so torch, Opacus and the ClientApp object are already imported and loaded (no interpreter start, no
re-import, no object store); the work crosses the process boundary as Flower's own protobuf messages
(``flwr.common.serde``), never pickle.

Wire (over a ``multiprocessing`` pipe, one ``send_bytes``/``recv_bytes`` frame each way, so a call costs the
parent one write and one read): request :func:`pair` ``(Message proto, Context proto)``; reply ``OK`` followed by
:func:`pair` ``(Message proto, Context proto)``, or ``ERROR`` followed by the reason when the ClientApp raised
(the parent turns it into Flower's error reply, as Ray's actor does). The worker exits on end-of-file: the parent
closed its end, or died.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import struct
import sys
import traceback
from multiprocessing.connection import Connection
from typing import Any

from flwr.clientapp import ClientApp

from ..flower_internals.serde import decode_context, decode_message, encode_context, encode_message
from ..forked import exit_forked

__all__ = ["OK", "ERROR", "WARM_IMPORTS", "child_main", "pair", "serve", "split_pair"]

OK = b"k"
ERROR = b"e"
_LENGTH = struct.Struct("<Q")
#: Imported by each worker as soon as it is forked when its clients run DP-SGD, while the simulating process is
#: still starting Flower's engine: torch's ``Optimizer.step`` (Opacus' optimizer wraps one) imports ``torch._dynamo``
#: on its first call, 1.5-2 s that used to sit in round 1. Plain training steps without it
#: (:class:`fedshield.training.PlainSGD`), so a run without DP-SGD warms nothing up.
WARM_IMPORTS = ("torch._dynamo",)
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), and leave now if it already has.

    Why both: a SIGKILLed parent runs no clean-up, and the pipe's end-of-file only reaches a worker that is waiting
    for work, not one in the middle of training.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(0)


def limit_threads(threads: int) -> None:
    """Give torch the thread count Ray gives an actor (one per reserved CPU), so N workers do not oversubscribe,
    and hide the GPUs as Ray does from a client that reserves none (CUDA cannot be used in a forked child)."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)


def warm_up(modules: tuple[str, ...] = WARM_IMPORTS) -> None:
    """Import what the first training step would (see :data:`WARM_IMPORTS`); a module that fails to import is left
    to fail where it is needed, with its real error."""
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception:  # pylint: disable=broad-exception-caught  # reported by the step that needs it
            pass


def pair(first: bytes, second: bytes, *, head: bytes = b"") -> bytes:
    """``head``, then ``first`` and ``second`` in one buffer (``first``'s length, then both): one copy of each."""
    return b"".join((head, _LENGTH.pack(len(first)), first, second))


def split_pair(frame: bytes, start: int = 0) -> tuple[memoryview, memoryview]:
    """The two parts :func:`pair` joined, from ``frame[start:]`` (views of ``frame``, not copies)."""
    (size,) = _LENGTH.unpack_from(frame, start)
    middle = start + _LENGTH.size + size
    view = memoryview(frame)
    return view[start + _LENGTH.size:middle], view[middle:]


def run_one(app: ClientApp, message_bytes: bytes | memoryview, context_bytes: bytes | memoryview) -> bytes:
    """The reply frame for one request: the ClientApp's reply and its updated Context, or why it raised."""
    try:
        context = decode_context(context_bytes)
        reply = app(message=decode_message(message_bytes), context=context)
        return pair(encode_message(reply), encode_context(context), head=OK)
    except Exception as exc:  # pylint: disable=broad-exception-caught  # reported to the server, as Ray does
        reason = f"{type(exc).__name__}: {exc}"
        print(f"fedshield local worker {os.getpid()}: the ClientApp raised\n{traceback.format_exc()}",
              file=sys.stderr, flush=True)
        return ERROR + reason.encode()


def serve(conn: Connection, app: ClientApp, *, threads: int, parent_pid: int,
          warm: tuple[str, ...] = WARM_IMPORTS) -> None:
    """Answer requests until the parent closes the pipe (or dies); ``warm``: what to import first (:func:`warm_up`)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends the workers
    limit_threads(threads)
    warm_up(warm)
    while True:
        try:
            request = conn.recv_bytes()
        except (EOFError, OSError):
            return
        reply = run_one(app, *split_pair(request))
        try:
            conn.send_bytes(reply)
        except OSError:
            return


def child_main(conn: Connection, app: ClientApp, *, threads: int, parent_pid: int, close: list[Any],
               warm: tuple[str, ...] = WARM_IMPORTS) -> None:
    """Entry point right after ``os.fork()``: never returns (``os._exit``), so no parent clean-up runs twice."""
    code = 0
    try:
        for other in close:  # the parent's ends of the other workers' pipes: their EOF must not wait on us
            other.close()
        serve(conn, app, threads=threads, parent_pid=parent_pid, warm=warm)
    except BaseException:  # pylint: disable=broad-exception-caught
        traceback.print_exc()
        code = 1
    finally:
        exit_forked(code)
