"""Session hygiene shared by every test: Ray writes under a private temp root that is removed at the end, and no
test may leave a child process behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def _children(pid: int) -> set[int]:
    """PIDs of live (non-zombie) descendants of ``pid``, read from /proc (no psutil dependency)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@pytest.fixture(scope="session", autouse=True)
def ray_temp_root() -> Iterator[Path]:
    # Ray's socket paths must stay short (AF_UNIX limit), hence a short root rather than pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))
    previous = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("RAY_TMPDIR", None)
    else:
        os.environ["RAY_TMPDIR"] = previous
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves a child process (a SuperLink, a SuperNode, a Ray worker) running."""
    before = _children(os.getpid())
    yield
    import time

    deadline = time.monotonic() + 15
    left = _children(os.getpid()) - before
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = _children(os.getpid()) - before
    assert not left, f"test left processes behind: {_describe(left)}"


def _describe(pids: set[int]) -> list[str]:
    """``pid: command line`` of each process, so a leak names its culprit."""
    out = []
    for pid in sorted(pids):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            cmdline = "(exited)"
        out.append(f"{pid}: {cmdline.strip()[:200]}")
    return out


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server-side Message construction needs the run identity that a ServerApp process has."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
