"""How a child forked from a Python process leaves: flush what it printed, then ``os._exit`` so that none of the
parent's clean-up (atexit handlers, ``finally`` blocks further up, buffered files it inherited) runs a second time.

Shared by the simulation's local workers (:mod:`fedshield.simulation.local_worker`) and the site's ClientApp
zygote (:mod:`fedshield.deploy.clientapp_zygote`)."""

from __future__ import annotations

import os
import sys
from typing import NoReturn

__all__ = ["exit_forked"]


def exit_forked(code: int) -> NoReturn:
    """Flush standard output and error, then end the process at once with ``code``, whatever the flush raised."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)
