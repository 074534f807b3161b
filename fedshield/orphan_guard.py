"""A Flower app process whose parent is gone exits within seconds instead of lingering.

Why: ``flwr-serverapp`` and ``flwr-clientapp`` watch their parent (Flower's ``--parent-pid`` monitor) and, when the
SuperLink or SuperNode dies, raise SIGINT in themselves for a graceful exit; that exit then talks to the dead parent
(final logs, task output, heartbeat). After ``fedshield server`` / ``client`` were SIGKILLed, a ``flwr-serverapp``
(loaded host) and a ``flwr-clientapp`` (quiet host) were still running 60 s later (tests/test_local_users.py).
Nothing is left to talk to by then, and every file fedshield writes is written atomically, so after a grace period
for Flower's own exit the process ends itself.

Started by the ServerApp's ``main`` and the ClientApp's handlers, never on import. It watches the parent the
process had when it started: in a simulation that is the test or shell process (ServerApp) or Ray's raylet
(ClientApps), whose death ends the simulation anyway.
"""

from __future__ import annotations

import os
import threading
import time

__all__ = ["EXIT_ORPHANED", "exit_when_orphaned"]

#: Exit status of an app process that ended itself because its parent was gone.
EXIT_ORPHANED = 75
_started = threading.Event()


def exit_when_orphaned(grace_s: float = 15.0, poll_s: float = 0.5) -> None:
    """From now on, exit this process ``grace_s`` seconds after its parent dies (it is re-parented). Once per
    process; a process already orphaned (parent pid 1) is left alone, as nothing can be said of its parent."""
    parent = os.getppid()
    if parent <= 1 or _started.is_set():
        return
    _started.set()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        time.sleep(grace_s)  # Flower's monitor has asked for a graceful exit; give it this long
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="fedshield-orphan-guard", daemon=True).start()
