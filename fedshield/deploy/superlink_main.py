"""``python -m fedshield.deploy.superlink_main``: ``flower-superlink`` whose HTTP API admits only its own user.

Flower 1.39 serves the Control API (``flwr supernode register``, ``flwr run``, ``flwr ls``) and the Runtime API
(where the SuperExec and ``flwr-serverapp`` fetch runs and messages) on one uvicorn server without any check of
who calls (see :mod:`fedshield.deploy.same_user` for what Flower's own SuperExec secret covers and why it does
not help). This launcher wraps that server's app in :class:`~fedshield.deploy.same_user.SameUserOnly`, then runs
Flower's own entry point with the same arguments. The Fleet API (gRPC, TLS + node authentication) is untouched:
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
    from fedshield.flower_internals.entry_points import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()()


if __name__ == "__main__":
    main()
