"""The SuperNode's SuperExec sleeps until its SuperNode signals a task (fedshield.deploy.superexec_wake).

Real signals and real child processes; the deployed rounds of tests/test_deploy_e2e.py run through it end to end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedshield.deploy.superexec_wake import SuperExecWaker, WakeableClock

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_the_sleep_between_polls_ends_when_the_signal_comes_and_not_before() -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        clock = WakeableClock(idle=120.0)
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        started = time.monotonic()
        clock.sleep(0.1)
        woken = time.monotonic() - started
        assert woken < 60.0, f"slept {woken:.1f} s: the signal did not wake it (idle 120 s)"
        os.kill(os.getpid(), signal.SIGUSR1)  # a signal between two sleeps is not lost: the next returns at once
        started = time.monotonic()
        clock.sleep(0.1)
        assert time.monotonic() - started < 60.0
        idle = WakeableClock(idle=0.2)
        started = time.monotonic()
        idle.sleep(0.01)  # no signal: it sleeps its idle time, at least
        assert time.monotonic() - started >= 0.19
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _child(tmp_path: Path, name: str) -> tuple[subprocess.Popen[bytes], Path]:
    marker = tmp_path / f"{name}.woken"
    script = tmp_path / name
    script.write_text(f"#!{sys.executable}\nimport signal, sys, time\nopen({str(tmp_path / (name + '.ready'))!r}, 'w')"
                      f".close()\nsignal.signal(signal.SIGUSR1, lambda *a: (open({str(marker)!r}, 'w').close(), "
                      "sys.exit(0)))\ntime.sleep(120)\n")
    script.chmod(0o700)
    child = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 60
    while not (tmp_path / f"{name}.ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return child, marker


def test_the_waker_signals_only_its_own_flower_superexec_child(tmp_path: Path) -> None:
    other, other_marker = _child(tmp_path, "not-a-superexec")
    superexec, marker = _child(tmp_path, "flower-superexec")
    try:
        waker = SuperExecWaker()
        waker.wake()
        assert superexec.wait(timeout=60) == 0 and marker.exists()
        waker.wake()  # its SuperExec is gone: nothing to signal, and no error
        assert other.poll() is None and not other_marker.exists()
    finally:
        for child in (other, superexec):
            child.kill()
            child.wait(timeout=30)
