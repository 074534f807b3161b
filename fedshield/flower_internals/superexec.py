"""Flower 1.39's SuperExec loop (``flwr/supercore/superexec/run_superexec.py``): its ``time`` module, so fedshield
can make its sleep between two task polls wake at once when the SuperNode signals a new task (applied when called,
never on import), and its entry point."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

__all__ = ["SUPEREXEC_LOOP", "flower_superexec", "replace_superexec_clock"]

#: The module whose loop polls the Runtime API for a task, then calls ``time.sleep(task_poll_interval)``.
SUPEREXEC_LOOP = "flwr.supercore.superexec.run_superexec"


def replace_superexec_clock(clock: Any) -> bool:
    """Make the SuperExec loop use ``clock`` as its ``time`` module; False (and a warning) if the loop no longer
    uses the ``time`` module as Flower 1.39 did, leaving Flower's own polling."""
    from flwr.supercore.superexec import run_superexec as loop

    if getattr(loop, "time", None) is not time:
        warnings.warn(f"fedshield: {SUPEREXEC_LOOP} no longer uses the time module as Flower 1.39 did; the SuperExec "
                      "polls for tasks at its own interval", RuntimeWarning, stacklevel=2)
        return False
    loop.time = clock  # type: ignore[attr-defined]
    return True


def flower_superexec() -> Callable[[], None]:
    from flwr.supercore.cli.flower_superexec import flower_superexec as main

    return main
