"""The local workers' wire (:func:`send_frame` / :func:`recv_frame` over a Unix socket pair): a message that fits
the socket's buffer goes in one ``sendmsg`` and comes in one ``recv`` (what the transfer latency measured in issue 13
depended on), a message larger than both buffers arrives whole, and a peer that closes early or sends more than one
frame is an error, never a short or merged message."""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from fedshield.simulation.local_worker import pair, recv_frame, send_frame, split_pair


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
    got = recv_frame(right)  # type: ignore[arg-type]
    assert left.calls["sendmsg"] == 1 and right.calls == {"sendmsg": 0, "recv": 1, "recv_into": 0}
    back = split_pair(got)
    assert (bytes(back[0]), bytes(back[1])) == (message, context)


def test_a_message_larger_than_the_buffers_arrives_whole(sockets: tuple[socket.socket, socket.socket]) -> None:
    left, right = sockets
    parts = (os.urandom(3 * 2**20 + 7), b"", os.urandom(1000))  # past _FIRST_READ and the socket buffer
    sender = threading.Thread(target=send_frame, args=(left, parts))
    sender.start()
    got = recv_frame(right)
    sender.join(30)
    assert bytes(got) == b"".join(parts) and not sender.is_alive()


def test_an_empty_frame_is_a_frame(sockets: tuple[socket.socket, socket.socket]) -> None:
    left, right = sockets
    send_frame(left, ())
    assert bytes(recv_frame(right)) == b""


def test_a_peer_that_closes_early_is_end_of_file(sockets: tuple[socket.socket, socket.socket]) -> None:
    left, right = sockets
    left.sendall(struct.pack("<Q", 100) + b"x" * 10)  # a frame of 100 bytes cut after 10
    left.shutdown(socket.SHUT_WR)
    with pytest.raises(EOFError, match="middle of a frame"):
        recv_frame(right)
    with pytest.raises(EOFError, match="closed"):  # and between frames
        recv_frame(right)


def test_bytes_past_the_frame_are_refused(sockets: tuple[socket.socket, socket.socket]) -> None:
    left, right = sockets
    left.sendall(struct.pack("<Q", 3) + b"abc" + b"more")  # one call at a time: nothing may follow a frame
    with pytest.raises(OSError, match="past the end of a frame"):
        recv_frame(right)


def test_a_closed_socket_fails_instead_of_reaching_another_file(sockets: tuple[socket.socket, socket.socket]) -> None:
    left, _ = sockets
    left.close()  # the pool closed it while a call was about to start: its fd number may be reused already
    with pytest.raises(OSError):
        send_frame(left, (b"request",))
    with pytest.raises(OSError):
        recv_frame(left)


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
    assert bytes(recv_frame(right)) == b"request"
    worker.hang_up()  # what LocalPool.close() does: a plain close() would leave the caller blocked
    caller.join(10)
    assert not caller.is_alive() and len(raised) == 1
    assert right.recv(1) == b""  # and the worker sees end-of-file
