"""Watching a benchmark's deployment from ``/proc``: CPU seconds of this process and every process it started
(:class:`CpuSampler`), and the ``flwr-clientapp`` processes the SuperNodes start (:class:`ClientAppWatcher`).

Round times on a shared 2-core machine mostly measure the neighbours; CPU seconds measure what a round costs.
A sampler thread reads ``/proc`` every ``interval`` s and keeps, per process of this process tree, its own CPU time
(``utime + stime``) and the CPU time of its children already reaped (``cutime + cstime``): a short-lived process
(a ``flwr-clientapp``, a ``flwr list``) is counted once its parent reaps it, even if no sample saw it alive.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fedshield.deploy.site import FedshieldClient

__all__ = ["ClientAppWatcher", "CpuSampler"]

_TICKS = os.sysconf("SC_CLK_TCK")
#: Command-line fragments that name a process's kind, first match wins.
KINDS = ("superlink_main", "supernode_main", "flower-superexec", "flwr-serverapp", "flwr-clientapp", "bin/flwr ")


def _kind(cmdline: str) -> str:
    return next((k.removeprefix("bin/").strip() for k in KINDS if k in cmdline), "other")


class CpuSampler:
    """``with sampler.measure() as got: ...`` then ``got`` maps process kind -> CPU seconds spent inside."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._times: dict[int, tuple[float, float]] = {}
        self._kinds: dict[int, str] = {}
        self._parents: dict[int, int] = {}
        self._lock = threading.Lock()

    def _scan(self) -> None:
        me, parents, stats = os.getpid(), {}, {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                pid = int(entry.name)
                parents[pid] = int(fields[1])
                stats[pid] = ((int(fields[11]) + int(fields[12])) / _TICKS, (int(fields[13]) + int(fields[14])) / _TICKS)
                if pid not in self._kinds:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    self._kinds[pid] = "benchmark process" if pid == me else _kind(cmd)
            except (OSError, IndexError, ValueError):
                continue
        children: dict[int, list[int]] = {}
        for pid, parent in parents.items():
            children.setdefault(parent, []).append(pid)
        todo, tree = [me], set()
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo += children.get(pid, [])
        with self._lock:
            for pid in tree:
                if pid in stats:
                    self._times[pid] = stats[pid]
                    self._parents[pid] = parents[pid]
            self._alive = set(stats)

    def _snapshot(self) -> dict[int, tuple[float, float]]:
        self._scan()
        with self._lock:
            return dict(self._times)

    @contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        got: dict[str, float] = {}
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.interval):
                self._scan()

        before = self._snapshot()
        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield got
        finally:
            stop.set()
            thread.join()
            after = self._snapshot()
            # A reaped child's whole lifetime CPU lands in its parent's cutime. What a sample saw of it (its last own
            # + reaped figures: counted in this window, or before the window for a process started earlier, e.g.
            # the previous run's ServerApp) must not be counted again; only its unsampled last moments are new.
            seen: dict[int, float] = {}
            for pid, (own, reaped) in after.items():
                if pid not in self._alive and pid in self._parents:
                    parent = self._parents[pid]
                    seen[parent] = seen.get(parent, 0.0) + own + reaped
            for pid, (own, reaped) in after.items():
                own0, reaped0 = before.get(pid, (0.0, 0.0))
                kind = self._kinds.get(pid, "other")
                got[kind] = got.get(kind, 0.0) + own - own0
                unseen = reaped - reaped0 - seen.get(pid, 0.0)
                if unseen > 0:  # children that exited unsampled: counted under their parent's kind
                    got[f"reaped by {kind}"] = got.get(f"reaped by {kind}", 0.0) + unseen


class ClientAppWatcher:
    """Counts the ClientApp processes the SuperNodes start (from their logs) and times them (from /proc)."""

    def __init__(self, clients: list[FedshieldClient]) -> None:
        self.clients, self.seen, self._stop = clients, {}, threading.Event()
        self.started = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            for pid in _clientapps():  # one /proc scan per tick, so short-lived processes are not missed
                first, _ = self.seen.get(pid, (now, now))
                self.seen[pid] = (first, now)
            time.sleep(0.05)

    @contextmanager
    def watching(self) -> Iterator[ClientAppWatcher]:
        self.seen, self._stop = {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        before = _clientapp_starts(self.clients)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.started = _clientapp_starts(self.clients) - before

    def lifetimes(self) -> list[float]:
        return [last - first for first, last in self.seen.values()]


def _clientapps() -> list[int]:
    """Every live ``flwr-clientapp`` process on this machine (the benchmark runs the only SuperNodes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"flwr-clientapp" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _clientapp_starts(clients: list[FedshieldClient]) -> int:
    """Exact count of ClientApp processes the SuperNodes started so far, from their logs."""
    return sum(c.supernode.process.log_text().count("Start `flwr-clientapp` process") for c in clients)
