"""The SuperLink's SQL state: the housekeeping Flower 1.39 runs on every Fleet request, run at most every
:data:`CLEANUP_EVERY_S` seconds there instead.

Each Fleet push of a reply, push or pull of an object, receipt confirmation, ``GetRun`` and ``GetFab`` starts with
``check_abort``, which
reads the run's status through ``SqlLinkState.get_run_status``, and that first runs ``_cleanup_expired_task_tokens``: two SQL
``UPDATE`` statements in one write transaction on the SQLite file, looking for tasks whose heartbeat expired.
Profiled on 3 sites (2026-12-05, py-spy, 200 Hz over 15 s of SecAgg+ rounds), ``check_abort`` was 21% of the
SuperLink's busy time and 68% of a node's object pull, for a sweep whose answer changes only when a ServerApp or
ClientApp stops heartbeating (Flower's task heartbeats are tens of seconds apart).

:func:`sweep_expired_tokens_less_often` lets that read skip the sweep if one ran less than ``CLEANUP_EVERY_S`` ago
in this process. Every other caller of the sweep (claiming, activating, finishing a task, acknowledging its
heartbeat, storing its messages) still runs it each time, so those transitions see exactly what they saw before. A
task whose heartbeat lapsed is noticed by a status read at most ``CLEANUP_EVERY_S`` later than with Flower's own.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

__all__ = ["CLEANUP_EVERY_S", "SQL_LINK_STATE", "sweep_expired_tokens_less_often"]

#: Flower 1.39's SQL link state; its ``get_run_status`` sweeps expired task tokens first.
SQL_LINK_STATE = "flwr.server.superlink.linkstate.sql_linkstate:SqlLinkState"
CLEANUP_EVERY_S = 0.5
_SWEEP = "_cleanup_expired_task_tokens"
_WRAPPED = "__fedshield_sweep_throttled__"
_LAST_SWEEP = "_fedshield_last_token_sweep"


def sweep_expired_tokens_less_often(every_s: float = CLEANUP_EVERY_S) -> bool:
    """Install the throttle on Flower's ``SqlLinkState`` (in the SuperLink process, before it serves); True if
    installed (or already), False if Flower's state no longer has the two methods (nothing is changed)."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    read, sweep = getattr(SqlLinkState, "get_run_status", None), getattr(SqlLinkState, _SWEEP, None)
    if read is None or sweep is None:
        return False
    if getattr(read, _WRAPPED, False):
        return True
    in_status_read = threading.local()
    lock = threading.Lock()

    @functools.wraps(sweep)
    def sweep_unless_recent(self: Any) -> None:
        if getattr(in_status_read, "active", False):
            with lock:  # per state object: two databases in one process do not throttle each other
                if time.monotonic() - getattr(self, _LAST_SWEEP, -float("inf")) < every_s:
                    return
        sweep(self)
        with lock:  # only a sweep that ran counts (one that raised is tried again on the next read)
            setattr(self, _LAST_SWEEP, time.monotonic())

    @functools.wraps(read)
    def get_run_status(self: Any, *args: Any, **kwargs: Any) -> Any:
        outer = getattr(in_status_read, "active", False)
        in_status_read.active = True
        try:
            return read(self, *args, **kwargs)
        finally:
            in_status_read.active = outer

    setattr(get_run_status, _WRAPPED, True)
    setattr(SqlLinkState, _SWEEP, sweep_unless_recent)
    SqlLinkState.get_run_status = get_run_status  # type: ignore[method-assign]
    return True
