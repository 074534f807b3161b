"""The simulation engine's dispatch loop (``vce_api.add_messages_to_queue``) and the in-memory state it reads.

:func:`swap_dispatch_loop` replaces Flower's loop for the duration of a ``with`` block only (never on import), and
restores whatever was there before, under a lock, so concurrent simulations in one process stay consistent.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState as InMemoryLinkState
from flwr.supercore.date import now as now

__all__ = ["FLOWER_POLL_S", "InMemoryLinkState", "check_stored_messages", "flower_dispatch_loop", "now",
           "swap_dispatch_loop"]

#: Flower's sweep interval (``f_stop.wait(0.1)`` in ``add_messages_to_queue``).
FLOWER_POLL_S = 0.1
#: Flower's own loop as imported, for states the replacement does not handle.
flower_dispatch_loop: Callable[..., None] = vce_api.add_messages_to_queue
_swap_lock = threading.Lock()


def check_stored_messages(state: InMemoryLinkState, message_ids: set[Any]) -> None:
    """Flower's TTL and federation check on stored messages (drops expired / out-of-federation ones)."""
    state._check_stored_messages(message_ids)


@contextmanager
def swap_dispatch_loop(replacement: Callable[..., None]) -> Iterator[None]:
    """Run Flower's simulation engine with ``replacement`` as its dispatch loop inside this block."""
    with _swap_lock:
        previous = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = replacement
    try:
        yield
    finally:
        with _swap_lock:
            vce_api.add_messages_to_queue = previous
