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


if __name__ == "__main__":
    main()
