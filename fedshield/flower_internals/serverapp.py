"""Flower helpers below its public strategy API that fedshield's strategies reuse, and the ServerApp's object-pull
backoff in deployment."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.exception import InconsistentMessageReplies as InconsistentMessageReplies
from flwr.supercore import log as log

__all__ = ["HTTP_GRID", "InconsistentMessageReplies", "log", "quicken_serverapp_pulls"]

#: The module of Flower 1.39's deployment grid; it pulls each reply's objects with ``pull_objects``.
HTTP_GRID = "flwr.superlink.grid.http_grid"


def quicken_serverapp_pulls(grid: Any) -> bool:
    """In a deployed ServerApp (``grid`` is Flower's HttpGrid): retry a reply's object the SuperLink does not have
    yet after 0.02 s (doubling up to 0.25 s; the SuperLink is on this machine) instead of Flower's 1-10 s.

    Why: a SuperNode pushes a reply's message before its objects, so a pull that lands in between finds an object
    missing, and Flower's first retry came a second later: measured, a SecAgg+ stage waited 1.1 s with every reply
    in. False (nothing changed) for any other grid, or (with a warning) if Flower's grid moved."""
    if type(grid).__module__ != HTTP_GRID:
        return False
    from .supernode import quicken_object_pulls

    return quicken_object_pulls(HTTP_GRID, "pull_objects", initial_backoff=0.02, backoff_cap=0.25)
