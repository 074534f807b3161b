"""``python -m fedshield.deploy.superlink_main``: ``flower-superlink`` whose HTTP API admits only its own user.

Flower 1.39 serves the Control API (``flwr supernode register``, ``flwr run``, ``flwr ls``) and the Runtime API
(where the SuperExec and ``flwr-serverapp`` fetch runs and messages) on one uvicorn server without any check of
who calls (see :mod:`fedshield.deploy.same_user` for what Flower's own SuperExec secret covers and why it does
not help). This launcher wraps that server's app in :class:`~fedshield.deploy.same_user.SameUserOnly`, then runs
Flower's own entry point with the same arguments (and our ``flower-superexec`` first on PATH). The Fleet API (gRPC, TLS + node authentication) is untouched:
sites on other hosts must reach it.
"""

from __future__ import annotations

import os
import sys

__all__ = ["main"]

#: Flower starts a second, unguarded gRPC Control API when this is "1": never in a fedshield SuperLink.
_GRPC_CONTROL_ENV = "FLWR_INTERNAL_GRPC_CONTROL_API"


def main() -> None:
    from fedshield.deploy.same_user import guard_create_app

    os.environ.pop(_GRPC_CONTROL_ENV, None)
    guard_create_app("flwr.superlink.main")
    _quiet_superexec()
    _hold_empty_pulls()
    _sweep_less_often()
    from fedshield.flower_internals.entry_points import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()()


def _quiet_superexec() -> None:
    """The SuperExec that Flower starts for ServerApps is ours too (:mod:`fedshield.deploy.superexec_wake`):
    Flower's entry point without its CLI package's other commands (~1 CPU-s per server start), polling for a run
    once a second instead of 10 times (each poll a Runtime API request and SQL queries in this SuperLink, for the
    whole run). Nothing wakes it, so a run's ServerApp starts up to 1 s later, once per run.
    ``FEDSHIELD_SUPEREXEC_WAKE=0`` keeps Flower's."""
    from fedshield.deploy.superexec_wake import install_superexec, wake_enabled

    if wake_enabled():
        install_superexec()


#: ``0`` answers every pull at once, as Flower does (for before/after measurements).
HELD_PULLS_ENV = "FEDSHIELD_HELD_PULLS"


def _hold_empty_pulls() -> None:
    """Pulls that find nothing wait up to ``PULL_HOLD_S`` (1 s) for a message instead of being polled again
    (:mod:`fedshield.flower_internals.held_pulls`); if Flower's modules moved, a warning and Flower's answers."""
    if os.environ.get(HELD_PULLS_ENV, "1") == "0":
        return
    from fedshield.flower_internals.held_pulls import hold_empty_pulls
    from fedshield.protocol import PULL_HOLD_S

    try:
        hold_empty_pulls(PULL_HOLD_S)
    except (ImportError, AttributeError, TypeError) as err:
        import warnings

        warnings.warn(f"fedshield: the SuperLink answers every pull at once, as Flower does ({err})", RuntimeWarning,
                      stacklevel=2)


#: ``0`` sweeps expired task tokens on every status read, as Flower does (for before/after measurements).
SWEEP_ENV = "FEDSHIELD_SWEEP_LESS_OFTEN"


def _sweep_less_often() -> None:
    """Flower's expired-token sweep (two SQL writes) on a run-status read at most every 0.5 s instead of on every
    Fleet request (:mod:`fedshield.flower_internals.link_state`)."""
    if os.environ.get(SWEEP_ENV, "1") == "0":
        return
    from fedshield.flower_internals.link_state import sweep_expired_tokens_less_often

    if not sweep_expired_tokens_less_often():
        import warnings

        warnings.warn("fedshield: Flower's SQL link state moved; the SuperLink sweeps expired tokens on every "
                      "request, as Flower does", RuntimeWarning, stacklevel=2)


if __name__ == "__main__":
    main()
