"""The SuperNode's heartbeat interval.

Flower 1.39 hard-codes it: the SuperNode's connection tells the SuperLink "30 s" and its ``HeartbeatSender`` paces
itself on the same constant, each reading its own module-level copy of ``HEARTBEAT_DEFAULT_INTERVAL``. The
SuperLink counts a node online until ``HEARTBEAT_PATIENCE`` (2) intervals after its last heartbeat, so a crashed
site holds a round (and a restart of the same node, refused while it is "online") for up to 60 s. Both copies
are set together, in the SuperNode's process only, or the node would announce one interval and keep another
(and flap offline).
"""

from __future__ import annotations

import importlib
import logging

__all__ = ["NODE_CONNECTION", "HEARTBEAT_SENDER", "set_node_heartbeat_interval"]

log = logging.getLogger(__name__)

#: The modules holding a copy of the constant: what the node announces, and how often it sends.
NODE_CONNECTION = "flwr.client.grpc_rere_client.connection"
HEARTBEAT_SENDER = "flwr.supercore.heartbeat"
_NAME = "HEARTBEAT_DEFAULT_INTERVAL"


def set_node_heartbeat_interval(seconds: float) -> bool:
    """Announce and keep ``seconds`` between heartbeats (Flower accepts 10 s to 30 min); call before the SuperNode
    connects. Returns False, leaving Flower's 30 s, if either copy of the constant has moved."""
    from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL

    if not HEARTBEAT_MIN_INTERVAL <= seconds <= HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"a heartbeat interval must be in [{HEARTBEAT_MIN_INTERVAL}, {HEARTBEAT_MAX_INTERVAL}] s, "
                         f"got {seconds}")
    modules = [importlib.import_module(name) for name in (NODE_CONNECTION, HEARTBEAT_SENDER)]
    if not all(isinstance(getattr(m, _NAME, None), (int, float)) for m in modules):
        log.warning("Flower's heartbeat constant moved: the SuperNode keeps Flower's own interval")
        return False
    for module in modules:
        setattr(module, _NAME, seconds)
    return True
