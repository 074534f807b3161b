"""The local channel between a SuperNode's ClientApp processes and the warm worker of ``fedshield client``.

One request and one reply per connection over a Unix socket, each a frame::

    b"FSW1" | header length (8 bytes, big-endian) | body length (8 bytes) | header (UTF-8 JSON) | body (.npz)

The header is a JSON object; the body holds the arrays, in the order of ``header["names"]``, as an uncompressed
``.npz`` that is read with ``allow_pickle=False`` (nothing that arrives here can execute code). Positional array
names in the archive keep any state-dict key (``np.savez`` reserves the keyword ``file``).

Requests: ``{"op": "train" | "evaluate", "config": {round settings}}`` with the global model's arrays.
Replies: ``{"ok": true, "metrics": {...}}`` (train: with the new arrays), or ``{"ok": false, "code": N,
"reason": "..."}`` which the ClientApp turns into the same error reply it would send itself.
"""

from __future__ import annotations

import io
import json
import socket
import struct
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from .round_work import WORKER_ERROR_CODE, Refusal, TrainResult

__all__ = ["MAX_FRAME_BYTES", "REPLY_TIMEOUT_S", "ProtocolViolation", "read_frame", "request_evaluate", "request_train", "write_frame"]

_MAGIC = b"FSW1"
_LENGTHS = struct.Struct("!QQ")
_MAX_HEADER_BYTES = 16 * 2**20
#: How long a ClientApp waits for the worker's reply: longer than any honest round, short of forever.
REPLY_TIMEOUT_S = 1800.0
#: Largest body accepted (a model of ~2 G float32 parameters); a corrupt length cannot make us allocate more.
MAX_FRAME_BYTES = 8 * 2**30


class ProtocolViolation(Exception):
    """A frame that is not a fedshield worker frame (wrong magic, oversized, truncated, malformed)."""


def write_frame(sock: socket.socket, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray] | None = None) -> None:
    names = list(arrays or {})
    head = json.dumps({**header, "names": names}, allow_nan=True).encode("utf-8")
    body = b""
    if names:
        buffer = io.BytesIO()
        np.savez(buffer, *[np.asarray(arrays[n]) for n in names])  # type: ignore[index]
        body = buffer.getvalue()
    sock.sendall(_MAGIC + _LENGTHS.pack(len(head), len(body)) + head + body)


def read_frame(sock: socket.socket) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if _read_exact(sock, len(_MAGIC)) != _MAGIC:
        raise ProtocolViolation("not a fedshield worker frame (bad magic)")
    head_len, body_len = _LENGTHS.unpack(_read_exact(sock, _LENGTHS.size))
    if head_len > _MAX_HEADER_BYTES or body_len > MAX_FRAME_BYTES:
        raise ProtocolViolation(f"frame too large (header {head_len} B, body {body_len} B)")
    try:
        header = json.loads(_read_exact(sock, head_len).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProtocolViolation(f"frame header is not JSON: {err}") from None
    if not isinstance(header, dict) or not isinstance(header.get("names", []), list):
        raise ProtocolViolation("frame header must be a JSON object with a list of array names")
    names = [str(n) for n in header.pop("names", [])]
    arrays: dict[str, np.ndarray] = {}
    if body_len:
        arrays = _decode(_read_exact(sock, body_len), names)
    elif names:
        raise ProtocolViolation(f"frame names {len(names)} arrays but has no body")
    return header, arrays


def _decode(body: bytes, names: list[str]) -> dict[str, np.ndarray]:
    try:
        # NEVER allow pickles here: the body came from another process.
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            if len(archive.files) != len(names):
                raise ProtocolViolation(f"frame names {len(names)} arrays but carries {len(archive.files)}")
            return {name: archive[f"arr_{i}"] for i, name in enumerate(names)}
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as err:  # object arrays, a torn or foreign archive
        raise ProtocolViolation(f"frame body is not an archive of plain arrays: {err}") from None


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ProtocolViolation(f"connection closed {n - left} bytes into a {n}-byte read")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def request_train(socket_path: str, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> TrainResult:
    """Ask the worker to train one round; raises :class:`Refusal` exactly as in-process training would."""
    header, out = _request(socket_path, {"op": "train", "config": dict(config)}, arrays)
    return TrainResult(out, _metrics(header))


def request_evaluate(socket_path: str, config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    header, _ = _request(socket_path, {"op": "evaluate", "config": dict(config)}, arrays)
    return _metrics(header)


def _request(
    socket_path: str, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(REPLY_TIMEOUT_S)
            sock.connect(socket_path)
            write_frame(sock, header, arrays)
            reply, out = read_frame(sock)
    except (OSError, ProtocolViolation) as err:
        raise Refusal(
            WORKER_ERROR_CODE,
            f"fedshield:worker-unreachable: this site's training worker at {socket_path} did not answer "
            f"({type(err).__name__}: {err}); the `fedshield client` process that serves this SuperNode has stopped: "
            "restart `fedshield client`",
        ) from None
    if not reply.get("ok"):
        raise Refusal(int(reply.get("code", WORKER_ERROR_CODE)), str(reply.get("reason", "the worker failed")))
    return reply, out


def _metrics(header: Mapping[str, Any]) -> dict[str, float]:
    metrics = header.get("metrics", {})
    if not isinstance(metrics, dict):
        raise Refusal(WORKER_ERROR_CODE, "fedshield:worker-error: the worker's reply has no metrics object")
    return {str(k): float(v) for k, v in metrics.items()}

