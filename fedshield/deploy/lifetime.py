"""A child process that cannot outlive the process that started it, even when that one is SIGKILLed.

Why: ``fedshield server`` / ``client`` start Flower in its own session (so a Ctrl-C reaches us first and we stop
it in order). Killed with SIGKILL, we run no cleanup, and the SuperLink or SuperNode used to run on, holding its
ports and its run. On Linux the kernel can deliver a signal to a child when its parent dies
(``prctl(PR_SET_PDEATHSIG)``); Flower's own helpers then follow it: the SuperExec and every
``flwr-serverapp``/``flwr-clientapp`` get ``--parent-pid`` and exit when their parent is gone.

Caveat (documented by the kernel): the signal fires when the *thread* that forked the child exits, so start such
children from a thread that lives as long as they should (the CLI's main thread).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return libc.prctl  # type: ignore[no-any-return]


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen` that makes the child receive ``sig`` when we die.

    ``None`` off Linux (no such kernel feature; the caller's :meth:`stop` still applies). Everything that could
    take a lock (loading libc) happens here, in the parent: between ``fork`` and ``exec`` the child only calls
    ``prctl`` and ``getppid``. If we died before ``prctl`` took effect, the child kills itself at once.
    """
    prctl = _libc_prctl()
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died between fork and prctl
            os.kill(os.getpid(), sig)

    return preexec
