"""Flower's own programs, started in-process by fedshield's launchers (imported when called)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["CLIENTAPP_MODULE", "flower_superlink", "flower_supernode", "flwr_clientapp"]

#: What every ``flwr-clientapp`` process imports first (the zygote pre-imports it).
CLIENTAPP_MODULE = "flwr.supernode.cli.flwr_clientapp"


def flower_superlink() -> Callable[[], None]:
    from flwr.superlink.cli.flower_superlink import flower_superlink as main

    return main


def flower_supernode() -> Callable[[], None]:
    from flwr.supernode.cli import flower_supernode as main

    return main


def flwr_clientapp() -> Callable[[], None]:
    from flwr.supernode.cli import flwr_clientapp as main

    return main

