"""Work that runs behind the round loop: one background thread, one job at a time, at most one job behind.

Why one shared shape: the server writes a round's files (:class:`~fedshield.server.run_writer.RunWriter`) and
tests and records a round (:class:`~fedshield.server.runner._AfterRound`) while the next round runs, and both need
the same guarantees: jobs run in order, a new job starts only after the previous one is done (so the work is never
more than one job behind), and a job's error is raised to the caller at its next call instead of being lost.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["OneBehind"]


class OneBehind:
    """A single background thread (started on first use, named ``name``) running at most one job at a time."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[Any] | None = None

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        """Wait for the previous job (raising its error), then start ``job(*args)`` in the background."""
        self.wait()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
        self._pending = self._executor.submit(job, *args)

    def wait(self) -> None:
        """Wait until the last job is done; raise what it raised (once)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the last job (raising its error), then let the thread go. Idempotent."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
