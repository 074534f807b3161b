"""Flower's own programs and Control API, started in-process by fedshield's launchers (imported when called)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["CLIENTAPP_MODULE", "flower_superlink", "flower_supernode", "flwr_clientapp", "list_nodes"]

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


def list_nodes(connection_name: str) -> list[Any]:
    """The SuperLink's stored nodes (``nodes_info``) through the Control API of the named ``flwr`` connection."""
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

    client = init_http_client_from_connection(read_superlink_connection(connection_name))
    try:
        return list(client.ListNodes(ListNodesRequest()).nodes_info)
    finally:
        client.close()
