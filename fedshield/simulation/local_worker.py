"""One worker of the local simulation backend: a forked process that runs the ClientApp for one message at a time.

Why a forked process and not Ray's actor: the worker is a copy of the simulating process made before Flower's
engine starts, so torch, Opacus and the ClientApp object are already imported and loaded (no interpreter start, no
re-import, no object store); the work crosses the process boundary as Flower's own protobuf messages
(``flwr.common.serde``), never pickle.

Wire (over a Unix socket pair, one frame each way: :func:`send_frame`, :func:`recv_frame`): request :func:`pair`
``(Message proto, Context proto)``; reply ``OK`` followed by :func:`pair` ``(Message proto, Context proto)``, or
``ERROR`` followed by the reason when the ClientApp raised (the parent turns it into Flower's error reply, as Ray's
actor does). The worker exits on end-of-file: the parent closed its end, or died.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Iterable
from typing import Any

from flwr.clientapp import ClientApp

from ..flower_internals.serde import decode_context, decode_message, encode_context, encode_message
from ..forked import exit_forked

__all__ = ["OK", "ERROR", "WARM_IMPORTS", "child_main", "pair", "recv_frame", "send_frame", "serve", "split_pair"]

OK = b"k"
ERROR = b"e"
_LENGTH = struct.Struct("<Q")
#: The first read of a frame asks for this much: a message that fits arrives in one ``read``.
_FIRST_READ = 256 * 1024
_MAX_READ = 64 * 2**20
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


def split_pair(frame: bytes | memoryview, start: int = 0) -> tuple[memoryview, memoryview]:
    """The two parts :func:`pair` joined, from ``frame[start:]`` (views of ``frame``, not copies)."""
    (size,) = _LENGTH.unpack_from(frame, start)
    middle = start + _LENGTH.size + size
    view = memoryview(frame)
    return view[start + _LENGTH.size:middle], view[middle:]


def send_frame(sock: socket.socket, parts: Iterable[bytes | memoryview]) -> None:
    """Send one frame (the parts' total length, then the parts) with as few ``sendmsg`` calls as the socket's
    buffer allows (one for a message that fits it), no part copied.

    Why not ``multiprocessing.Connection.send_bytes``: it writes a large message's length and its bytes in two
    calls; the reader wakes on the first, and the writer, a thread of the simulating process, must win the GIL
    back before the second (seen in ``strace``: a worker waited 1.8 ms on the rest of its request). Measured at
    100 clients (issue 13): the time a message spent outside the worker's ClientApp call went from 1.26-1.43 ms
    to 1.11-1.16 ms (median to mean)."""
    views = [memoryview(part).cast("B") for part in parts]
    views.insert(0, memoryview(_LENGTH.pack(sum(len(v) for v in views))))
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if views and sent:
            views[0] = views[0][sent:]


def recv_frame(sock: socket.socket) -> memoryview:
    """Receive one :func:`send_frame` frame: its payload. A message that fits :data:`_FIRST_READ` and was sent in
    one call comes in one ``recv``; a larger one is received into one buffer of its size. ``EOFError`` when the peer
    closed before a whole frame; ``OSError`` for bytes read past the frame (one call is in flight at a time)."""
    first = sock.recv(_FIRST_READ)
    if not first:
        raise EOFError("the peer closed the socket")
    while len(first) < _LENGTH.size:
        first += _recv_more(sock)
    (size,) = _LENGTH.unpack_from(first)
    end = _LENGTH.size + size
    if len(first) > end:
        raise OSError(f"{len(first) - end} bytes arrived past the end of a frame: the peer broke the "
                      "one-call-at-a-time wire")
    if len(first) == end:
        return memoryview(first)[_LENGTH.size:]
    payload = memoryview(bytearray(size))
    have = len(first) - _LENGTH.size
    payload[:have] = memoryview(first)[_LENGTH.size:]
    while have < size:
        got = sock.recv_into(payload[have:], min(size - have, _MAX_READ))
        if not got:
            raise EOFError("the peer closed the socket in the middle of a frame")
        have += got
    return payload


def _recv_more(sock: socket.socket) -> bytes:
    chunk = sock.recv(_FIRST_READ)
    if not chunk:
        raise EOFError("the peer closed the socket in the middle of a frame")
    return chunk


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


def serve(conn: socket.socket, app: ClientApp, *, threads: int, parent_pid: int,
          warm: tuple[str, ...] = WARM_IMPORTS) -> None:
    """Answer requests on ``conn`` (a socket) until the parent closes it (or dies); ``warm``: what to import first
    (:func:`warm_up`)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends the workers
    limit_threads(threads)
    warm_up(warm)
    while True:
        try:
            request = recv_frame(conn)
        except (EOFError, OSError):
            return
        reply = run_one(app, *split_pair(request))
        try:
            send_frame(conn, (reply,))
        except OSError:
            return


def child_main(conn: socket.socket, app: ClientApp, *, threads: int, parent_pid: int, close: list[Any],
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
