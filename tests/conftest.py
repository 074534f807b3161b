"""Session hygiene shared by every test: every temp file (``TMPDIR``, for the tests and every process they start),
fedshield's calibration cache and Ray's files go under private roots removed at the end, and no test may leave a child process behind; how the tests are spread over pytest-xdist workers (``_schedule``).

Parallel-safe by construction: every check of leftover processes looks only at the descendants of its own worker
(``_children(os.getpid())``) or of the processes its test started, ports come from the OS (``free_port``), files
go to ``tmp_path`` and Ray's to a per-worker root."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _cpu_profile import pytest_runtest_protocol  # noqa: F401  (a hook: off unless FEDSHIELD_TEST_CPU_LOG)
from _schedule import assign_groups, order_by_expected_time


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


#: Set by the first pytest process (the xdist controller) to the session's temp root; workers inherit it.
SESSION_TMP_ENV = "FEDSHIELD_TEST_TMPROOT"


def _session_temp_root(config: pytest.Config) -> None:
    """Point ``TMPDIR`` (this process, and every process a test starts) at one short private root that is removed
    when the session ends: what a SIGKILLed SuperNode, zygote or worker could not clean up, pytest's own
    ``tmp_path`` trees and hypothesis' files all go with it. Mode 0711: the unprivileged local user of the
    attacker tests may traverse it to its own home (``_nobody.py``), never list it."""
    if os.environ.get(SESSION_TMP_ENV):  # an xdist worker: the controller owns the root
        return
    root = tempfile.mkdtemp(prefix="fst-", dir="/tmp")  # short: AF_UNIX socket paths inside must fit 108 bytes
    os.chmod(root, 0o711)
    os.environ[SESSION_TMP_ENV] = os.environ["TMPDIR"] = root
    tempfile.tempdir = None  # re-read TMPDIR
    # fedshield's calibration cache (fedshield/privacy/calibration_cache.py) for the session's processes: never the
    # user's own, and shared, so each configuration the suite runs is calibrated once.
    os.environ["FEDSHIELD_CACHE_DIR"] = os.path.join(root, "cache")
    config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))


def pytest_configure(config: pytest.Config) -> None:
    """The session's temp root (above). Hypothesis: no example database, its other files in a temp dir removed at
    the end (no ``.hypothesis/`` left in the checkout), no per-example deadline (a busy shared machine is not a
    failure); each property test sets its own modest ``max_examples``."""
    from hypothesis import settings
    from hypothesis.configuration import set_hypothesis_home_dir

    _session_temp_root(config)
    home = tempfile.mkdtemp(prefix="fshyp-")
    config.add_cleanup(lambda: shutil.rmtree(home, ignore_errors=True))
    set_hypothesis_home_dir(home)
    settings.register_profile("fedshield", database=None, deadline=None, print_blob=True)
    settings.load_profile("fedshield")


#: Two workers on CI's two cores: with four, the real-process and Ray tests slowed each other down 3-6x (load
#: average 17-20) until in-test deadlines and Ray's start-up timed out; two keep every test near its own pace.
WORKERS = 2


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (pyproject's addopts): ``WORKERS`` processes when a directory runs (the README's command runs
    ``tests/``), none for named files or tests, whose few seconds each worker's start-up would only add to;
    ``PYTEST_XDIST_AUTO_NUM_WORKERS`` or ``-n N`` overrides either."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    paths = [Path(str(arg).split("::", 1)[0]) for arg in config.args]
    return WORKERS if any(p.is_dir() for p in paths) else 0


@pytest.hookimpl(wrapper=True)  # a wrapper runs before every plain hook, xdist's (which reads the marks) included
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    """Pin tests sharing an expensive module fixture to one xdist worker; hand out the longest work first."""
    groups = assign_groups(items)
    for item, group in zip(items, groups, strict=True):
        if group is not None and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(group))
        if hasattr(config, "workerinput"):  # only an xdist worker's ids reach the scheduler
            _suffix_group(item)
    items[:] = order_by_expected_time(items, groups)
    return (yield)


def _suffix_group(item: pytest.Item) -> None:
    """``--dist loadgroup`` finds a test's group as an ``@group`` suffix of its node id. xdist 3.8 writes it to
    ``item._nodeid``, which pytest 9 no longer reads (``nodeid`` comes from ``item._id``), so groups were silently
    ignored (measured: a module fixture set up on two workers); write it where pytest 9 reads it."""
    marks = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                    for m in item.iter_markers("xdist_group")})
    if marks and "@" not in item.nodeid.rpartition("]")[2]:
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(marks)}")  # type: ignore[attr-defined]


@pytest.fixture(scope="session", autouse=True)
def ray_temp_root() -> Iterator[Path]:
    # Ray's socket paths must stay short (AF_UNIX limit), hence a short root rather than pytest's tmp_path.
    root = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))  # not under TMPDIR: as short as it gets
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
def restored_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that builds a simulation link state (which sets the process's TaskIdentity, as run_simulation does)
    gets the identity back as it was, for the tests after it."""
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, getattr(TaskIdentity, name))


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server-side Message construction needs the run identity that a ServerApp process has."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
