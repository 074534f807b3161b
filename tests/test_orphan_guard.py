"""A ServerApp process whose parent (the SuperLink) is SIGKILLed ends itself after the grace period; one whose
parent lives on keeps running. Real processes: a parent that starts the guarded child, then is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from _processes import alive

#: The guarded "ServerApp": starts the guard (grace 1 s), then waits far longer than any test.
CHILD = "from fedshield.orphan_guard import exit_when_orphaned as g; g(grace_s=1.0, poll_s=0.1); " \
        "import time; time.sleep(300)"
#: The "SuperLink": starts the child, says its pid, and lives until killed.
PARENT = f"import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', {CHILD!r}]); " \
         "print(c.pid, flush=True); time.sleep(300)"


def _start_pair() -> tuple[subprocess.Popen[str], int]:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    assert parent.stdout is not None
    return parent, int(parent.stdout.readline())


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def test_the_child_of_a_killed_parent_exits_after_the_grace_period() -> None:
    parent, child = _start_pair()
    try:
        time.sleep(1.5)  # the child has imported fedshield and started its guard
        assert alive(child)
        parent.kill()
        parent.wait(timeout=10)
        assert _gone_within(child, 20), "the orphaned ServerApp process is still running"
    finally:
        for pid in (parent.pid, child):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        parent.wait(timeout=10)


def test_the_child_of_a_living_parent_keeps_running() -> None:
    parent, child = _start_pair()
    try:
        time.sleep(3.0)  # guard started, several polls and more than the grace period have passed
        assert alive(child), "the guard ended a ServerApp whose SuperLink is alive"
    finally:
        os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait(timeout=10)
        _gone_within(child, 10)
