"""A SuperNode's SuperExec that sleeps until its SuperNode has a task, instead of polling for one 10 times a second.

Why: Flower 1.39's SuperExec asks its SuperNode's Runtime API for a task, then sleeps
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` (fedshield sets 0.1 s, Flower's default is 1 s, and every message waits up
to that long before its ClientApp starts). Each poll is an HTTP request that both processes spend CPU on, all the
time, at every site: ~4% of a core per idle site on a 2-core machine, which a round's training then lacks.

Here the SuperNode launcher (:mod:`fedshield.deploy.supernode_main`) puts a ``flower-superexec`` of ours first on
PATH (Flower starts it by that name). It runs Flower's SuperExec unchanged except for its sleep between polls: it
waits up to ``max(interval, IDLE_S)`` seconds but returns as soon as ``SIGUSR1`` arrives (a handler writes to a
self-pipe the sleep selects on: no signal mask, so nothing the SuperExec launches inherits one). The SuperNode sends
``SIGUSR1`` to its own SuperExec child when a message's task exists (the first object fetch of a receive, and after
it): the ClientApp starts at once instead of after up to 0.1 s, and an idle site polls once a second.
A lost signal costs at most ``IDLE_S`` of latency, never a message. The signal goes only to a child of this
process whose command line is ``flower-superexec`` (checked before every send: a recycled PID is never signalled).
``FEDSHIELD_SUPEREXEC_WAKE=0`` keeps Flower's polling (for before/after measurements).

The SuperLink's SuperExec (which starts ServerApps) is this one too (:mod:`fedshield.deploy.superlink_main`), with
nothing to wake it: it polls for a run once a second.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

__all__ = ["IDLE_S", "WAKE_ENV", "WakeableClock", "SuperExecWaker", "install_superexec", "main", "wake_enabled"]

WAKE_ENV = "FEDSHIELD_SUPEREXEC_WAKE"
#: Longest sleep between two polls of a woken SuperExec (Flower's own default interval).
IDLE_S = 1.0
_WAKE_SIGNAL = signal.SIGUSR1
_COMMAND = "flower-superexec"


def wake_enabled(environ: Any = os.environ) -> bool:
    return environ.get(WAKE_ENV, "1") != "0" and sys.platform.startswith("linux")


class WakeableClock:
    """The ``time`` module, except that ``sleep`` lasts ``max(seconds, idle)`` or until ``SIGUSR1``, whichever
    comes first. Install in the main thread (Python runs signal handlers there)."""

    def __init__(self, idle: float = IDLE_S, clock: ModuleType = time) -> None:
        self.idle, self._clock = idle, clock
        self._read, self._write = os.pipe()  # non-inheritable (PEP 446)
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        signal.signal(_WAKE_SIGNAL, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        try:
            os.write(self._write, b"!")
        except BlockingIOError:  # already full of wake-ups: one is enough
            pass

    def sleep(self, seconds: float) -> None:
        select.select([self._read], [], [], max(seconds, self.idle))
        try:
            while os.read(self._read, 512):
                pass
        except BlockingIOError:
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clock, name)


class SuperExecWaker:
    """In the SuperNode: send ``SIGUSR1`` to this process's ``flower-superexec`` child, if it runs."""

    def __init__(self) -> None:
        self._pid: int | None = None

    def wake(self) -> None:
        pid = self._pid if self._pid is not None and _is_our_superexec(self._pid) else _find_superexec()
        self._pid = pid
        if pid is not None:
            try:
                os.kill(pid, _WAKE_SIGNAL)
            except OSError:  # it just exited: the next wake looks again
                self._pid = None


def _is_our_superexec(pid: int) -> bool:
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, IndexError, ValueError):
        return False
    return parent == os.getpid() and any(part.endswith(_COMMAND.encode()) for part in command[:2])


def _find_superexec() -> int | None:
    children: list[str] = []
    try:
        for task in Path(f"/proc/{os.getpid()}/task").iterdir():  # each thread's children
            children += (task / "children").read_text().split()
    except OSError:
        children = [e.name for e in Path("/proc").iterdir() if e.name.isdigit()]
    return next((int(pid) for pid in children if _is_our_superexec(int(pid))), None)


def install_superexec() -> Path:
    """Put our ``flower-superexec`` first on PATH for the SuperNode (or SuperLink) that starts next; returns its
    directory (removed when this process exits)."""
    import atexit
    import shutil

    from ..runtime_dirs import private_runtime_dir

    directory = private_runtime_dir("fedshield-superexec-")  # 0700; swept by the next start if we are SIGKILLed
    script = directory / _COMMAND
    script.write_text(f"#!{sys.executable}\n# fedshield: Flower's SuperExec, woken by its SuperNode "
                      "(fedshield.deploy.superexec_wake).\nfrom fedshield.deploy.superexec_wake import main\nmain()\n",
                      encoding="utf-8")
    script.chmod(0o700)
    atexit.register(shutil.rmtree, directory, True)
    os.environ["PATH"] = f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"
    return directory


def main() -> None:
    """``flower-superexec`` with the wakeable sleep (module docstring); Flower's own otherwise."""
    from ..flower_internals.superexec import flower_superexec, replace_superexec_clock

    replace_superexec_clock(WakeableClock())
    sys.argv[0] = _COMMAND
    flower_superexec()()


if __name__ == "__main__":
    main()
