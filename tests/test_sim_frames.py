"""The local workers' wire (:func:`send_frame` / :class:`FrameReader` over a Unix socket pair): a message that fits
the socket's buffer goes in one ``sendmsg`` and comes in one ``recv`` (what the transfer latency measured in issue 13
depended on), a message larger than both buffers arrives whole, frames queued back to back come out one by one and
whole, and a peer that closes early is an error, never a short or merged message."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from fedshield.simulation.local_worker import FrameReader, pair, send_frame, split_pair


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        yield left, right


class _Counting:
    """A socket that counts its ``sendmsg`` and ``recv`` calls (the system calls a frame costs)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.calls = sock, {"sendmsg": 0, "recv": 0, "recv_into": 0}

    def __getattr__(self, name: str) -> object:
        real = getattr(self.sock, name)
        if name not in self.calls:
            return real

        def counted(*args: object) -> object:
            self.calls[name] += 1
            return real(*args)

        return counted


def test_a_message_that_fits_is_one_send_and_one_receive(sockets: tuple[socket.socket, socket.socket]) -> None:
    left, right = _Counting(sockets[0]), _Counting(sockets[1])
    message, context = os.urandom(25_000), os.urandom(600)  # a digits model and its context, as in a round
    send_frame(left, (pair(message, context),))  # type: ignore[arg-type]
    got = FrameReader(right).read()  # type: ignore[arg-type]
    assert left.calls["sendmsg"] == 1 and right.calls == {"sendmsg": 0, "recv": 1, "recv_into": 0}
    back = split_pair(got)
    assert (bytes(back[0]), bytes(back[1])) == (message, context)


def test_a_message_larger_than_the_buffers_arrives_whole(sockets: tuple[socket.socket, socket.socket]) -> None:
    left, right = sockets
    parts = (os.urandom(3 * 2**20 + 7), b"", os.urandom(1000))  # past _FIRST_READ and the socket buffer
    sender = threading.Thread(target=send_frame, args=(left, parts))
    sender.start()
    got = FrameReader(right).read()
    sender.join(30)
    assert bytes(got) == b"".join(parts) and not sender.is_alive()


def test_an_empty_frame_is_a_frame(sockets: tuple[socket.socket, socket.socket]) -> None:
    left, right = sockets
    send_frame(left, ())
    assert bytes(FrameReader(right).read()) == b""


def test_a_peer_that_closes_early_is_end_of_file(sockets: tuple[socket.socket, socket.socket]) -> None:
    left, right = sockets
    left.sendall(struct.pack("<Q", 100) + b"x" * 10)  # a frame of 100 bytes cut after 10
    left.shutdown(socket.SHUT_WR)
    reader = FrameReader(right)
    with pytest.raises(EOFError, match="middle of a frame"):
        reader.read()
    with pytest.raises(EOFError, match="closed"):  # and between frames
        reader.read()


def test_frames_queued_back_to_back_come_out_one_by_one(sockets: tuple[socket.socket, socket.socket]) -> None:
    """The pool queues a worker's next request before reading its reply (``local_pool.DEPTH``): one ``recv`` may take
    in a frame and the start of the next. Sizes around the first read's 256 KiB and the length field's 8 bytes."""
    left, right = sockets
    frames = [b"abc", b"", os.urandom(300_000), b"x" * 5, os.urandom(262_140), os.urandom(70_000), b"end"]
    sender = threading.Thread(target=lambda: [send_frame(left, (f,)) for f in frames])
    sender.start()
    reader = FrameReader(right)
    got = [bytes(reader.read()) for _ in frames]
    sender.join(30)
    assert got == frames and not sender.is_alive()
    left.sendall(struct.pack("<Q", 2) + b"ok" + struct.pack("<Q", 9)[:3])  # a frame, then 3 bytes of a length
    assert bytes(reader.read()) == b"ok"
    left.sendall(struct.pack("<Q", 9)[3:] + b"123456789")
    assert bytes(reader.read()) == b"123456789"


def test_a_closed_socket_fails_instead_of_reaching_another_file(sockets: tuple[socket.socket, socket.socket]) -> None:
    left, _ = sockets
    left.close()  # the pool closed it while a call was about to start: its fd number may be reused already
    with pytest.raises(OSError):
        send_frame(left, (b"request",))
    with pytest.raises(OSError):
        FrameReader(left).read()


def test_hanging_up_wakes_a_caller_blocked_on_a_reply(sockets: tuple[socket.socket, socket.socket]) -> None:
    from fedshield.simulation.local_pool import _Worker

    left, right = sockets  # right: a worker that took the request and never answers
    worker = _Worker(pid=0, conn=left)
    raised: list[BaseException] = []

    def call() -> None:
        try:
            worker.call(b"request")
        except (EOFError, OSError) as exc:
            raised.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert bytes(FrameReader(right).read()) == b"request"
    worker.hang_up()  # what LocalPool.close() does: a plain close() would leave the caller blocked
    caller.join(10)
    assert not caller.is_alive() and len(raised) == 1
    assert right.recv(1) == b""  # and the worker sees end-of-file


def test_queued_requests_each_get_their_own_reply(sockets: tuple[socket.socket, socket.socket]) -> None:
    """Several callers queue requests on one worker (``local_pool.DEPTH``); the worker answers in order, and each
    caller reads the reply to its own request, whichever caller starts waiting first."""
    from fedshield.simulation.local_pool import _Worker

    left, right = sockets
    worker = _Worker(pid=0, conn=left)

    def echo() -> None:  # a worker that takes all requests first, then answers each in order
        requests = FrameReader(right)
        taken = [bytes(requests.read()) for _ in range(6)]
        for request in taken:
            send_frame(right, (b"re:" + request,))

    server = threading.Thread(target=echo)
    server.start()
    tickets = [(worker.send(f"q{i}".encode()), f"q{i}".encode()) for i in range(6)]
    got: dict[bytes, bytes] = {}

    def wait(ticket: int, request: bytes) -> None:
        got[request] = bytes(worker.receive(ticket))

    callers = [threading.Thread(target=wait, args=t) for t in reversed(tickets)]  # the last ticket waits first
    for caller in callers:
        caller.start()
    for caller in callers + [server]:
        caller.join(10)
    assert got == {request: b"re:" + request for _, request in tickets}


def test_a_request_queued_behind_a_fatal_one_is_known_never_to_have_run(
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    """A worker that dies in the middle of one request never read the next: its caller learns that (and the pool
    runs it on another worker) instead of reporting a client that failed."""
    from fedshield.simulation.local_pool import _NeverRan, _Worker

    left, right = sockets
    worker = _Worker(pid=0, conn=left)
    first, second = worker.send(b"fatal"), worker.send(b"innocent")
    assert bytes(FrameReader(right).read()) == b"fatal"
    right.close()  # the worker died running "fatal"
    with pytest.raises(EOFError) as raised:
        worker.receive(first)
    assert not isinstance(raised.value, _NeverRan)  # the fatal request itself did fail
    with pytest.raises(_NeverRan):
        worker.receive(second)
    with pytest.raises(_NeverRan):  # and a request sent to the dead worker afterwards
        worker.call(b"later")
