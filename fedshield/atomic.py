"""Crash-safe file writes: a reader sees the old file or the new one, never half of either.

Ledgers, checkpoints and run reports are all written through here. The data goes to a temporary file in the same
directory (so the rename cannot cross a filesystem), is flushed and fsynced, then renamed over the target with
``os.replace``, which POSIX makes atomic; the directory is fsynced so the rename itself survives a power cut.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_json"]


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically; ``mode`` is applied before the file becomes visible."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        # Never leave a stray temp file behind, even on KeyboardInterrupt.
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, obj: Any, *, mode: int = 0o644) -> None:
    # allow_nan=False: a NaN epsilon in a privacy report must fail loudly, not be written as invalid JSON.
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n", mode=mode)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (e.g. tmpfs on some kernels) refuse fsync on directories; the rename still happened
    finally:
        os.close(fd)
