"""A watcher that kills what a simulation started once the simulation is gone, even after a SIGKILL.

Why: Ray ties its GCS, raylet and workers to the driver (the kernel's parent-death signal), but the raylet's
``DashboardAgent`` and ``RuntimeEnvAgent`` outlive a SIGKILLed driver for a minute or more (measured with Ray 2.55),
holding their ports. A SIGKILLed process runs no cleanup, so the cleanup lives in another process: this watcher
remembers the descendants the simulation starts (PID and start time, so a reused PID is never hit) and, when the pipe it
reads from closes (the simulation exited, however), SIGKILLs every one of them still running.

Run as ``python -m fedshield.simulation.reaper PID`` with the read end of a pipe as stdin; :func:`reap_on_exit`
does that.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["reap_on_exit"]

_POLL_S = 0.25


def _stat(pid: int) -> tuple[int, str] | None:
    """``(parent PID, start time)`` of a live (non-zombie) process, or ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def _descendants(root: int) -> dict[int, str]:
    table = {int(p.name): s for p in Path("/proc").iterdir() if p.name.isdigit() and (s := _stat(int(p.name)))}
    found: dict[int, str] = {}
    frontier = {root}
    while frontier:
        frontier = {pid for pid, (ppid, _) in table.items() if ppid in frontier and pid not in found}
        found.update({pid: table[pid][1] for pid in frontier})
    return found


def _watch(parent: int) -> None:
    # What already ran before the simulation (another child of a test runner) is not ours to kill.
    before = set(_descendants(parent).items())
    seen: dict[int, str] = {}
    me = os.getpid()
    while not select.select([sys.stdin.buffer], [], [], _POLL_S)[0]:
        now = _descendants(parent).items()
        seen.update({pid: start for pid, start in now if pid != me and (pid, start) not in before})
    for pid, start in seen.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@contextmanager
def reap_on_exit() -> Iterator[None]:
    """Inside, a watcher kills this process's descendants once this process ends (Linux; a no-op elsewhere)."""
    if not Path("/proc/self/stat").exists():
        yield
        return
    read_end, write_end = os.pipe()
    try:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "fedshield.simulation.reaper", str(os.getpid())],
            stdin=read_end, stdout=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    finally:
        os.close(read_end)
    os.set_inheritable(write_end, False)  # only we hold it: its close (our exit) is the watcher's signal
    try:
        yield
    finally:
        os.close(write_end)
        watcher.wait(timeout=30)


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
