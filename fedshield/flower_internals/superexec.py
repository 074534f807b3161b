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


#: The package of Flower's infrastructure commands; its ``__init__`` imports all four of them.
_CLI_PACKAGE = "flwr.supercore.cli"


def flower_superexec() -> Callable[[], None]:
    """Flower's ``flower-superexec`` entry point, for a process that runs nothing else.

    Imported without running ``flwr.supercore.cli``'s ``__init__``, which also imports the agent-app, connector
    and model commands (SQLAlchemy and Flower's link state): about 1 of the 2.2 CPU-s the command takes to start,
    paid at every SuperNode start. The package is entered in ``sys.modules`` as a bare package over the same
    directory, so its submodules import as usual; if that import fails (a Flower that moved the module), the
    package is imported as Flower does.
    """
    import sys
    import types

    if _CLI_PACKAGE not in sys.modules:
        import flwr.supercore

        bare = types.ModuleType(_CLI_PACKAGE)
        bare.__path__ = [f"{path}/cli" for path in flwr.supercore.__path__]
        sys.modules[_CLI_PACKAGE] = bare
        try:
            from flwr.supercore.cli.flower_superexec import flower_superexec as main

            return main
        except ImportError:
            del sys.modules[_CLI_PACKAGE]
    from flwr.supercore.cli.flower_superexec import flower_superexec as main

    return main
