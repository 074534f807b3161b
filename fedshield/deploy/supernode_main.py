"""``flower-supernode`` with its polling shortened: ``python -m fedshield.deploy.supernode_main [flower-supernode args]``.

Flower 1.39's SuperNode loop (``flwr/supernode/start_client_internal.py``) sleeps 3 s whenever it pulls and finds no
message, and polls 0.5 s for a reply to send back; neither is configurable. A message that arrives while the node
sleeps waits up to 3 s before anything starts, and SecAgg+ sends five messages per node and round one after the
other, so a round paid ~7-15 s for these sleeps alone. This launcher caps every sleep of that one module (they are
all poll waits; nothing there sleeps for correctness) at ``FEDSHIELD_SUPERNODE_POLL_S`` seconds (default 0.5);
waits on the node's own state (for its ClientApp's reply) at 0.02 s, and while a round goes (30 s after such a
wait) the SuperLink poll at 0.2 s (:class:`CappedSleepClock`); after a pull that fedshield's SuperLink held until
a message came or its hold ended (:mod:`fedshield.flower_internals.held_pulls`), it pulls again without sleeping.
Then it runs Flower's own entry point unchanged.
It also forks the ClientApp zygote (:mod:`fedshield.deploy.clientapp_zygote`), so each per-message ClientApp
starts with Flower imported (``FEDSHIELD_CLIENTAPP_ZYGOTE_ON=0`` starts them cold, as Flower does), and puts its own
``flower-superexec`` first on PATH, which the node wakes when a message's task exists instead of letting it poll
for one every 0.1 s (:mod:`fedshield.deploy.superexec_wake`; ``FEDSHIELD_SUPEREXEC_WAKE=0`` keeps the polling).

On a fedshield site (the default; ``--fedshield-any-app`` turns it off for generic Flower apps in our own tests)
it first puts the site's own ``flwr-clientapp`` (:mod:`fedshield.deploy.site_clientapp`) first on PATH, so the
SuperExec never runs code from the coordinator's app bundle, and it refuses ``--allow-runtime-dependency-installation``
(installing a bundle's dependencies runs the coordinator's build code).

The cost is requests: an idle node asks the SuperLink for work every 0.5 s instead of every 3 s (small gRPC calls;
100 idle sites are ~200 requests a second), a node in a round every 0.2 s. When the module no longer looks as
expected (another Flower version), nothing is patched and a warning says so: the SuperNode still works, at
Flower's pace.

It also makes a run stopped while the node is fetching a message an ordinary failure that Flower cleans up
(:func:`fedshield.flower_internals.supernode.fail_receive_on_stopped_run`: without it the message's ClientApp waited
up to 2 hours for objects that never came), and lets the node retry an object the SuperLink does not have yet
after 0.05 s (doubling up to 1 s) instead of Flower's 1 s (doubling up to 10 s). ``FEDSHIELD_SUPERNODE_QUICK=0``
keeps the waits as they were before (all capped at the poll interval, Flower's backoff), for measurements.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ..protocol import HELD_PULL_S as _HELD_PULL_S

__all__ = [
    "DEFAULT_POLL_S",
    "POLL_ENV",
    "QUICK_ENV",
    "ANY_APP_FLAG",
    "ZYGOTE_SWITCH_ENV",
    "CappedSleepClock",
    "install_site_clientapp",
    "guard_runtime_api",
    "main",
    "patch_supernode_polling",
    "patch_supernode_receiving",
    "preload_clientapp_modules",
    "quick_waits",
    "quicken_clientapp_pulls",
    "start_clientapp_zygote",
]

POLL_ENV = "FEDSHIELD_SUPERNODE_POLL_S"
QUICK_ENV = "FEDSHIELD_SUPERNODE_QUICK"
DEFAULT_POLL_S = 0.5
#: ``0`` starts every ClientApp cold, as Flower does; anything else (the default) forks them from the pre-imported
#: zygote. It was opt-in while a run stopped (``flwr stop``) mid-message left a forked ClientApp waiting in Flower's
#: ``pull_objects``; the cause was Flower's SuperNode, which left the half-received message and its live task behind
#: (a cold ClientApp that got there hangs the same way: it was only slower to get there). Fixed for both by
#: :func:`fedshield.flower_internals.supernode.fail_receive_on_stopped_run`; tests/test_zygote_stop_race.py.
ZYGOTE_SWITCH_ENV = "FEDSHIELD_CLIENTAPP_ZYGOTE_ON"
#: Launcher-only flag (removed before Flower parses the arguments): run any app bundle's ClientApp, as stock Flower.
ANY_APP_FLAG = "--fedshield-any-app"
_DEPENDENCY_INSTALL_FLAG = "--allow-runtime-dependency-installation"


class CappedSleepClock:
    """The ``time`` module, except that ``sleep`` never waits longer than ``cap`` seconds; with ``quick``, shorter.

    Flower 1.39's loop sleeps 3 s when the SuperLink had no message (a network poll) and 0.5 s while it waits for
    its own ClientApp's reply in its in-memory state (no network). With ``quick`` the local waits last at most
    ``LOCAL_WAIT_S``, and for ``BUSY_S`` seconds after one (a round is going: its next message comes soon) the
    network poll waits at most ``BUSY_POLL_S``; an idle node polls every ``cap`` seconds.
    """

    LOCAL_WAIT_S = 0.02
    BUSY_POLL_S = 0.2
    BUSY_S = 30.0
    #: An empty pull that took about the SuperLink's hold was held (:mod:`fedshield.flower_internals.held_pulls`):
    #: it already waited for a message, so the node pulls again at once. A SuperLink that answers at once (Flower's)
    #: takes milliseconds, and the node sleeps as above. The clock sees only sleeps, so what it times is everything
    #: since the last one: the pull, and a reply pushed just before it (then, on Flower's SuperLink, one extra pull).
    HELD_PULL_S = _HELD_PULL_S

    def __init__(self, cap: float, clock: ModuleType = time, *, quick: bool = False) -> None:
        self.cap = cap
        self.quick = quick
        self._clock = clock
        self._busy_until = -math.inf
        self._awake_since = clock.monotonic()

    def sleep(self, seconds: float) -> None:
        if not self.quick:
            self._clock.sleep(min(seconds, self.cap))
        elif seconds < 1.0:  # a wait on the node's own state
            self._busy_until = self._clock.monotonic() + self.BUSY_S
            self._clock.sleep(min(seconds, self.LOCAL_WAIT_S, self.cap))
        elif self._clock.monotonic() - self._awake_since < self.HELD_PULL_S:  # a pull answered at once
            busy = self._clock.monotonic() < self._busy_until
            self._clock.sleep(min(seconds, self.cap, self.BUSY_POLL_S if busy else math.inf))
        self._awake_since = self._clock.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._clock, name)


def quick_waits(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """``FEDSHIELD_SUPERNODE_QUICK=0`` keeps the waits of before (every sleep capped at the poll interval, Flower's
    1-10 s object-pull backoff): for before/after measurements (benchmarks/deploy_overhead.py --before)."""
    return environ.get(QUICK_ENV, "1") != "0"


def poll_seconds(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    raw = environ.get(POLL_ENV, "")
    if not raw:
        return DEFAULT_POLL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (0.01 <= value <= 3.0):
        raise SystemExit(f"error: {POLL_ENV} must be a number of seconds in [0.01, 3], got {raw!r}")
    return value


def patch_supernode_polling(cap: float) -> bool:
    """Cap the sleeps of Flower's SuperNode loop; False (and a warning) if its module is not as expected."""
    from ..flower_internals.supernode import cap_supernode_sleeps

    return cap_supernode_sleeps(CappedSleepClock(cap, quick=quick_waits()))


def patch_supernode_receiving(on_task: Callable[[], None] | None = None,
                              answer: Callable[[Any, Any, int, str, int], bool] | None = None) -> bool:
    """A run stopped mid-receive is cleaned up (its ClientApp is refused and ends); object pulls retry sooner;
    ``on_task`` is called when a message's task exists (:mod:`fedshield.deploy.superexec_wake`); ``answer`` may
    answer a message in this process (:mod:`fedshield.deploy.node_stages`)."""
    from ..flower_internals import supernode as internals

    cleaned = internals.fail_receive_on_stopped_run(on_task, answer)
    if not quick_waits():
        return cleaned
    quick = internals.quicken_object_pulls(internals.SUPERNODE_LOOP, "pull_objects", initial_backoff=0.05,
                                           backoff_cap=1.0)
    return cleaned and quick


def quicken_clientapp_pulls() -> bool:
    """In a ClientApp process: retry a message object the SuperNode does not have yet after 0.02 s (doubling up to
    0.25 s; it is on this machine) instead of 1-10 s, so a ClientApp that starts before its message is complete, or
    whose task was revoked, learns it at once."""
    from ..flower_internals import supernode as internals

    if not quick_waits():
        return False
    return internals.quicken_object_pulls(internals.CLIENTAPP_RUNNER, "pull_and_inflate_object_from_tree",
                                          initial_backoff=0.02, backoff_cap=0.25)


def install_site_clientapp() -> Path:
    """Put the site's ``flwr-clientapp`` (:mod:`fedshield.deploy.site_clientapp`) first on PATH; returns its
    directory (removed when this process exits)."""
    import atexit
    import shutil

    from ..runtime_dirs import private_runtime_dir

    directory = private_runtime_dir("fedshield-site-bin-")  # 0700; swept by the next start if we are SIGKILLed
    script = directory / "flwr-clientapp"
    script.write_text(
        f"#!{sys.executable}\n# fedshield: the site's own ClientApp runner (fedshield.deploy.site_clientapp).\n"
        "from fedshield.deploy.site_clientapp import main\nmain()\n",
        encoding="utf-8",
    )
    script.chmod(0o700)
    atexit.register(shutil.rmtree, directory, True)
    os.environ["PATH"] = f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"
    return directory


def _site_entry() -> None:
    from .site_clientapp import main as site_main

    site_main()


#: What a ClientApp process imports after it starts, besides its entry point and app: Flower's HTTP client loads
#: httpcore (and h11) only when it builds its transport, the FAB is a zip (cp437 names), and the warm worker's wire.
#: Measured with cProfile in each forked child (2026-12-04): 0.2 s of imports per ClientApp, five per site and
#: SecAgg+ round, before these were imported in the zygote.
CLIENTAPP_LATE_IMPORTS = ("httpcore", "h11", "encodings.cp437", "fedshield.client.warm_worker_wire")


def preload_clientapp_modules() -> None:
    """Import everything a ClientApp process needs, so a child forked from this one imports nothing."""
    import importlib

    from ..flower_internals.entry_points import CLIENTAPP_MODULE

    for name in (CLIENTAPP_MODULE, "fedshield.client.app", "fedshield.deploy.site_clientapp", *CLIENTAPP_LATE_IMPORTS):
        importlib.import_module(name)


def start_clientapp_zygote(*, site_code_only: bool = True) -> bool:
    """Fork the pre-imported ``flwr-clientapp`` parent (:mod:`fedshield.deploy.clientapp_zygote`) and put its shim
    first on PATH for the SuperExec that Flower starts next. Must run before Flower starts any thread."""
    if os.environ.get(ZYGOTE_SWITCH_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import shutil

    real = shutil.which("flwr-clientapp")
    if real is None:
        return False
    preload_clientapp_modules()
    quicken_clientapp_pulls()  # inherited by every forked ClientApp

    from .clientapp_zygote import ZYGOTE_ENV, Zygote, write_shim

    if len(os.listdir("/proc/self/task")) > 1:  # a thread already runs: forking now could deadlock the zygote
        return False
    zygote = Zygote(entry=_site_entry if site_code_only else None)
    write_shim(zygote.bin, real)
    parent = os.getpid()
    if os.fork() == 0:
        zygote.serve(parent)  # never returns
    os.environ[ZYGOTE_ENV] = zygote.socket_path
    os.environ["PATH"] = f"{zygote.bin}{os.pathsep}{os.environ.get('PATH', '')}"
    return True


def set_heartbeat() -> bool:
    """Heartbeat every :data:`~fedshield.protocol.NODE_HEARTBEAT_S` instead of Flower's 30 s: the server then
    notices a crashed site within two intervals (30 s, not 60 s), so a round waits less for it and the site
    restarts sooner (a node still counted online cannot reconnect)."""
    from ..flower_internals.heartbeat import set_node_heartbeat_interval
    from ..protocol import NODE_HEARTBEAT_S

    return set_node_heartbeat_interval(NODE_HEARTBEAT_S)


def _superexec_waker() -> Callable[[], None] | None:
    """Our ``flower-superexec`` first on PATH, and what wakes it when a message arrives; None when switched off
    (``FEDSHIELD_SUPEREXEC_WAKE=0``: Flower's polling)."""
    from .superexec_wake import SuperExecWaker, install_superexec, wake_enabled

    if not wake_enabled():
        return None
    install_superexec()
    return SuperExecWaker().wake


def _node_stage_answerer(dependency_install: bool) -> Callable[[Any, Any, int, str, int], bool] | None:
    """What answers SecAgg+'s key and unmask stages in this process; None when switched off
    (``FEDSHIELD_NODE_STAGES=0``: a ClientApp answers every message), or when ClientApps may install an app
    bundle's dependencies (any-app mode): a ClientApp could then run another fedshield than this process, on the
    same SecAgg+ state."""
    from .node_stages import NodeStageAnswerer, node_stages_enabled

    return NodeStageAnswerer() if node_stages_enabled() and not dependency_install else None


def guard_runtime_api() -> None:
    """Admit only this user's processes to the SuperNode's Runtime API (its ``--host/--port``).

    Flower 1.39 hands a site's tasks (node config, SecAgg+ secret keys, the server's message) to any caller of that
    API; the site's own ``flwr-clientapp`` processes run as the site's user, so nothing legitimate is refused.
    """
    from .same_user import guard_create_app

    guard_create_app("flwr.supernode.main")


def main() -> None:
    # Before NumPy loads: OpenBLAS would start its thread pool at import, and a fork (the zygote) must happen in a
    # process with one thread. Nothing in a SuperNode or a ClientApp shim does heavy BLAS; training runs elsewhere.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    site_code_only = ANY_APP_FLAG not in sys.argv
    sys.argv = [a for a in sys.argv if a != ANY_APP_FLAG]
    if site_code_only:
        if _DEPENDENCY_INSTALL_FLAG in sys.argv:
            raise SystemExit(f"error: a fedshield site never installs an app bundle's dependencies: drop "
                             f"{_DEPENDENCY_INSTALL_FLAG}")
        install_site_clientapp()
    patch_supernode_polling(poll_seconds())
    patch_supernode_receiving(_superexec_waker(), _node_stage_answerer(_DEPENDENCY_INSTALL_FLAG in sys.argv))
    start_clientapp_zygote(site_code_only=site_code_only)
    guard_runtime_api()  # after the zygote's fork: it imports FastAPI and NumPy
    set_heartbeat()  # after the fork too: the ClientApps' task heartbeats keep Flower's pace
    from ..flower_internals.entry_points import flower_supernode

    sys.argv[0] = "flower-supernode"
    flower_supernode()()


if __name__ == "__main__":
    main()
