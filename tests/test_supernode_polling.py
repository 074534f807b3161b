"""The SuperNode launcher: Flower's own SuperNode, with its hard-coded 3 s idle poll capped."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedshield.protocol import PULL_HOLD_S
from fedshield.deploy.supernode_main import (
    DEFAULT_POLL_S,
    POLL_ENV,
    QUICK_ENV,
    CappedSleepClock,
    poll_seconds,
    quick_waits,
)


def test_the_installed_flower_supernode_loop_is_patched_and_sleeps_at_most_the_cap() -> None:
    """Fails when a Flower upgrade changes the module the launcher patches (it would then only warn)."""
    code = (
        "import time, warnings\n"
        "from fedshield.deploy.supernode_main import patch_supernode_polling\n"
        "from flwr.supernode import start_client_internal as loop\n"
        "import inspect; assert 'time.sleep(3)' in inspect.getsource(loop), 'Flower changed its idle poll'\n"
        "warnings.simplefilter('error', RuntimeWarning); assert patch_supernode_polling(0.05)\n"
        "t = time.monotonic(); loop.time.sleep(3); took = time.monotonic() - t\n"
        "assert took < 1.0, took; assert loop.time.time() > 0; print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr


def test_the_capped_clock_waits_the_shorter_of_the_two() -> None:
    clock = CappedSleepClock(0.01)
    start = clock.monotonic()
    clock.sleep(5)
    clock.sleep(0)
    assert clock.monotonic() - start < 1.0


class _Recorder:
    """A clock that only records what it was asked to sleep (the capped clock's arithmetic, not the wait)."""

    def __init__(self) -> None:
        self.now, self.slept = 100.0, []  # type: ignore[var-annotated]

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_the_quick_clock_splits_local_waits_from_the_superlink_poll_and_polls_faster_in_a_round() -> None:
    recorder = _Recorder()
    clock = CappedSleepClock(0.5, recorder, quick=True)  # type: ignore[arg-type]
    clock.sleep(3)  # idle: the configured poll
    clock.sleep(0.5)  # waiting for its ClientApp's reply: a round is going
    clock.sleep(3)  # the next message of the round comes soon: poll faster
    for _ in range(int(CappedSleepClock.BUSY_S / CappedSleepClock.BUSY_POLL_S)):
        clock.sleep(3)  # the round ended: polls answered at once, while BUSY_S passes
    clock.sleep(3)  # idle again
    assert recorder.slept[:3] == [0.5, CappedSleepClock.LOCAL_WAIT_S, CappedSleepClock.BUSY_POLL_S]
    tail = recorder.slept[3:]  # the round's quick polls, then the idle ones
    assert tail == sorted(tail) and set(tail) == {CappedSleepClock.BUSY_POLL_S, 0.5}
    slow = _Recorder()
    before = CappedSleepClock(0.5, slow)  # type: ignore[arg-type]
    before.sleep(3), before.sleep(0.5), before.sleep(3)
    assert slow.slept == [0.5, 0.5, 0.5]  # FEDSHIELD_SUPERNODE_QUICK=0: every wait as before
    assert quick_waits({}) and quick_waits({QUICK_ENV: "1"}) and not quick_waits({QUICK_ENV: "0"})


def test_the_poll_interval_comes_from_the_environment_and_is_checked() -> None:
    assert poll_seconds({}) == DEFAULT_POLL_S
    assert poll_seconds({POLL_ENV: "0.2"}) == 0.2
    for bad in ("fast", "0", "10", "nan"):
        with pytest.raises(SystemExit, match=POLL_ENV):
            poll_seconds({POLL_ENV: bad})


def test_after_a_pull_the_superlink_held_the_node_pulls_again_without_sleeping() -> None:
    """fedshield's SuperLink holds an empty pull until a message comes (flower_internals.held_pulls): the node must
    not then sleep its poll interval on top, or a message stored just after the hold ended waits for it. A pull
    answered at once (Flower's SuperLink) is followed by the usual sleep."""
    recorder = _Recorder()
    clock = CappedSleepClock(0.5, recorder, quick=True)  # type: ignore[arg-type]
    clock.sleep(3)  # answered at once: the idle poll
    recorder.now += PULL_HOLD_S  # the next pull was held for the whole hold
    clock.sleep(3)  # no sleep: pull again at once
    clock.sleep(3)  # answered at once again: the idle poll
    assert recorder.slept == [0.5, 0.5]
    off = CappedSleepClock(0.5, _Recorder(), quick=False)  # type: ignore[arg-type]
    off._clock.now += 10  # type: ignore[attr-defined]
    off.sleep(3)
    assert off._clock.slept == [0.5]  # type: ignore[attr-defined]  # FEDSHIELD_SUPERNODE_QUICK=0: as before
