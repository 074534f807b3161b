"""Wait, for a bounded time, until the run's clients are connected.

Flower's strategies wait for ``min_available_nodes`` in a loop with no deadline (``strategy_utils.sample_nodes``
logs "Waiting for nodes to connect" every second, forever). A run whose federation is smaller than ``num-clients``
(``flwr run .`` on Flower's default local federation of 2 simulated nodes, or a site that never starts) would
hang without a word. The ServerApp waits here first, so it fails after ``node-wait-timeout`` seconds with a
message that names both fixes instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from ..errors import FedshieldError

__all__ = ["NodeWaitTimeout", "wait_for_nodes"]


class NodeWaitTimeout(FedshieldError):
    """Fewer clients than the run needs connected within ``node-wait-timeout`` seconds."""


class _NodeSource(Protocol):
    def get_node_ids(self) -> object: ...


def wait_for_nodes(
    grid: _NodeSource,
    need: int,
    *,
    timeout: float,
    poll: float = 0.25,
    first_poll: float = 0.01,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Return how many nodes are connected once at least ``need`` are; raise :class:`NodeWaitTimeout` when
    ``timeout`` seconds pass first. ``grid`` is Flower's ``Grid`` (only ``get_node_ids`` is used).

    The wait between looks starts at ``first_poll`` and doubles up to ``poll``: a simulation's nodes register
    within milliseconds of the ServerApp's start, and a flat 0.25 s cost every simulation a quarter of a second
    before round 1."""
    deadline = clock() + timeout
    interval = max(1e-3, min(first_poll, poll))
    while True:
        online = len(list(grid.get_node_ids()))  # type: ignore[call-overload]
        if online >= need:
            return online
        if clock() >= deadline:
            raise NodeWaitTimeout(
                f"only {online} of the {need} clients this run needs (num-clients) connected within "
                f"node-wait-timeout = {timeout:g} s: start {need} nodes (flwr run: --federation-config "
                f"\"num-supernodes={need}\"; fedshield server: start more sites) or lower num-clients"
            )
        sleep(min(interval, max(0.0, deadline - clock())))
        interval = min(2 * interval, poll)
