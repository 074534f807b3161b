"""A local Ray for ``fedshield simulate`` that listens on 127.0.0.1 only.

Why: by default Ray 2.x starts its GCS, raylet, object manager and every worker with gRPC servers on all interfaces
(``*``) and advertises the machine's address; anyone who can reach the host could connect a driver and run code as
the simulating user. Ray has no listen-address option for those servers; it binds them to loopback only when the
node's IP is exactly ``127.0.0.1``. Passing ``_node_ip_address="127.0.0.1"`` is not enough on Linux:
``ray._private.services.resolve_ip_for_localhost`` turns 127.0.0.1 back into the machine's address unless
``ray_constants.ENABLE_RAY_CLUSTER`` is off (its environment variable, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, is
read when Ray is imported). Measured with Ray 2.55: with both, every Ray listener is on 127.0.0.1.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["LOOPBACK", "loopback_init_args", "loopback_ray"]

LOOPBACK = "127.0.0.1"
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def loopback_init_args() -> dict[str, Any]:
    """``ray.init`` arguments for a single-machine Ray on loopback (no dashboard: it would be one more port)."""
    return {"_node_ip_address": LOOPBACK, "include_dashboard": False}


@contextmanager
def loopback_ray() -> Iterator[None]:
    """While inside, a Ray started here resolves its own address to 127.0.0.1; restores everything after.

    The environment variable reaches the processes Ray starts; the module constant is what this process reads.
    """
    from ray._private import ray_constants as constants

    previous_env = os.environ.get(_CLUSTER_ENV)
    previous_constant = constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTER_ENV] = "0"
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if previous_env is None:
            os.environ.pop(_CLUSTER_ENV, None)
        else:
            os.environ[_CLUSTER_ENV] = previous_env
        constants.ENABLE_RAY_CLUSTER = previous_constant
