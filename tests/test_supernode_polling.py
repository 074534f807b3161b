"""The SuperNode launcher: Flower's own SuperNode, with its hard-coded 3 s idle poll capped."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedshield.deploy.supernode_main import DEFAULT_POLL_S, POLL_ENV, CappedSleepClock, poll_seconds


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


def test_the_poll_interval_comes_from_the_environment_and_is_checked() -> None:
    assert poll_seconds({}) == DEFAULT_POLL_S
    assert poll_seconds({POLL_ENV: "0.2"}) == 0.2
    for bad in ("fast", "0", "10", "nan"):
        with pytest.raises(SystemExit, match=POLL_ENV):
            poll_seconds({POLL_ENV: bad})
