"""The SuperNode loop's ``time`` module, which fedshield swaps to cap its idle sleeps (when called, never on import)."""

from __future__ import annotations

import time
import warnings
from typing import Any

__all__ = ["SUPERNODE_LOOP", "cap_supernode_sleeps"]

#: Flower 1.39's SuperNode loop module; it calls ``time.sleep(3)`` when it pulls and finds no message.
SUPERNODE_LOOP = "flwr.supernode.start_client_internal"


def cap_supernode_sleeps(clock: Any) -> bool:
    """Make the SuperNode loop use ``clock`` as its ``time`` module; False (and a warning) if the loop no longer
    uses the ``time`` module as Flower 1.39 did, leaving Flower's own pace."""
    from flwr.supernode import start_client_internal as loop

    if getattr(loop, "time", None) is not time:
        warnings.warn(
            f"fedshield: {SUPERNODE_LOOP} no longer uses the time module as Flower 1.39 did; "
            "the SuperNode runs with Flower's own polling (3 s when idle)",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    loop.time = clock
    return True
