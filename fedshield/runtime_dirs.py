"""Private per-process directories under the system temp dir that do not pile up when a process is killed hard.

A site's SuperNode, its ClientApp zygote and its training worker each need a short private directory (mode 0700)
for a Unix socket or a ``flwr-clientapp`` shim: short because AF_UNIX paths are limited to 108 bytes, private
because the directory's mode is what keeps another local user off the socket. Each process removes its directory
when it exits normally, but a SIGKILL (an OOM kill, ``kill -9``, a power-cycled container) runs no clean-up, and a
site restarted many times would fill ``/tmp`` with dead directories.

So the directory's name carries the PID of the process whose life it belongs to (``<prefix><pid>-<random>``), and
creating one first removes this user's directories of the same prefix whose process is gone. Only directories
owned by this user (``lstat``: never through a symlink) are touched; another user's, or a live process's, never.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = ["MAX_SOCKET_PATH", "private_runtime_dir", "sweep_dead"]


#: AF_UNIX socket paths: 108 bytes on Linux, 104 on macOS; a little margin.
MAX_SOCKET_PATH = 100
#: Where the directory goes when the temp dir's path is too long for a socket inside it.
_SHORT_ROOT = Path("/tmp")


def private_runtime_dir(prefix: str, *, owner_pid: int | None = None, socket_name: str = "") -> Path:
    """A new 0700 directory ``<tmp>/<prefix><owner_pid>-<random>``, after sweeping dead ones of ``prefix``.

    ``owner_pid``: the process whose life the directory belongs to (default: this one); the directory is swept
    once that process is gone. ``socket_name``: a Unix socket the caller will bind inside; if the temp dir's path
    is too long for it (a deep ``TMPDIR``), the directory goes to ``/tmp`` instead of failing at ``bind``.
    """
    pid = os.getpid() if owner_pid is None else owner_pid
    root = Path(tempfile.gettempdir())
    # mkdtemp adds 8 characters; the separators add 2
    if socket_name and len(f"{root}/{prefix}{pid}-{'x' * 8}/{socket_name}") > MAX_SOCKET_PATH and _SHORT_ROOT.is_dir():
        root = _SHORT_ROOT
    sweep_dead(prefix, root)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{pid}-", dir=root))


def sweep_dead(prefix: str, root: Path | None = None) -> list[Path]:
    """Remove this user's ``<prefix><pid>-*`` directories under ``root`` (the temp dir) whose process is gone;
    returns what was removed. A name without a PID (an older version's) is left alone."""
    base = Path(tempfile.gettempdir() if root is None else root)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    uid = os.geteuid()
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = _owner_pid(entry.name[len(prefix):])
        if pid is None or _alive(pid):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == uid:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


def _owner_pid(rest: str) -> int | None:
    head, sep, _ = rest.partition("-")
    return int(head) if sep and head.isdigit() and int(head) > 0 else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
