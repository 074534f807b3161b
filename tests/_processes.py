"""Helpers shared by the deployment and reliability tests: ``python -m fedshield ...`` commands in their own
sessions, SIGKILL of a whole process tree (a crash or a power cut at a site), and the sites' data files."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fedshield.deploy.process import live_descendants

__all__ = ["Cli", "alive", "digits_sites", "kill_tree", "long_simulation", "still_alive_after"]


@dataclass
class Cli:
    """A ``python -m fedshield ...`` process in its own session, output appended to a file."""

    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(cls, args: list[str], log: Path, *, sigint_ignored: bool = False) -> Cli:
        """``sigint_ignored``: start it as a shell without job control starts a background command (SIGINT
        ignored, inherited through exec), which Ctrl-C must still stop."""
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
        with log.open("ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "fedshield", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=ignore)
        return cls(proc, log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float, *, start: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the output from character ``start`` on; fails if the process exits
        or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.text()[start:])) is None:
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {pattern!r}:\n{self.text()}"
            assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n{self.text()}"
            time.sleep(0.2)
        return match

    def kill(self) -> None:
        """SIGKILL the process and everything it started, at once."""
        kill_tree(self.proc.pid)
        self.proc.wait(timeout=30)

    def interrupt(self, timeout: float = 60.0) -> int:
        """Ctrl-C, as a user would; SIGKILL to everything it started if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once."""
    for p in [pid, *live_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def digits_sites(root: Path, n: int) -> list[Path]:
    """scikit-learn's digits split in ``n``, one CSV per site: 64 pixel columns and a label, as a site exports."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    header = ",".join([f"pixel{i}" for i in range(64)] + ["label"])
    paths = []
    for i, part in enumerate(np.array_split(np.random.default_rng(0).permutation(len(digits.target)), n), 1):
        rows = np.column_stack([digits.data[part].astype(int), digits.target[part]])
        paths.append(root / f"site-{i}.csv")
        np.savetxt(paths[-1], rows, delimiter=",", header=header, comments="", fmt="%d")
    return paths


def still_alive_after(pids: list[int], timeout: float, *, poll: float = 0.2) -> list[int]:
    """Wait up to ``timeout`` seconds for every process in ``pids`` to be gone; the ones still alive then."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(poll)
    return left


def long_simulation(tmp_path: Path, backend: str) -> Cli:
    """``fedshield simulate`` of 40 quick rounds (2 clients, no DP, no SecAgg+) on ``backend``: long enough for a
    test to look at its processes, then kill it."""
    return Cli.start(["simulate", "--backend", backend, "--clients", "2", "--rounds", "40", "--no-dp", "--no-secagg",
                      "--seed", "1", "--out", str(tmp_path / "run")], tmp_path / "simulate.out")
