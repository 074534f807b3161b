"""Which backend Flower's simulation engine runs the ClientApps on, and the context that sets it up.

``local`` (:mod:`fedshield.simulation.local_backend`): forked worker processes on this machine, no Ray start.
``ray``: Flower's ``RayBackend``, on a local Ray bound to 127.0.0.1 (:mod:`fedshield.simulation.ray_local`) or,
with ``ray_address``, on an existing cluster; the only choice for GPU shares and clusters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from flwr.clientapp import ClientApp

from ..errors import ConfigError

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "choose_backend", "engine_backend"]

BACKENDS = ("local", "ray")
#: Chosen by benchmarks/RESULTS.md's sim-backend section (start to first round, client-rounds/s, same accuracy).
DEFAULT_BACKEND = "local"


def choose_backend(backend: str | None, *, ray_address: str | None = None, gpus_per_client: float = 0.0) -> str:
    """The backend to run: ``backend`` if given (checked), else ``ray`` for a cluster or GPU shares, else the
    default."""
    if backend is None:
        return "ray" if ray_address or gpus_per_client > 0 else DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise ConfigError(f"unknown simulation backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if backend == "local" and ray_address:
        raise ConfigError(f"--ray-address {ray_address} runs the clients on a Ray cluster, but --backend local runs "
                          "them on this machine: drop one of the two")
    if backend == "local" and gpus_per_client > 0:
        raise ConfigError(f"--gpus-per-client {gpus_per_client:g} needs Ray to share GPUs between clients: add "
                          "--backend ray, or drop --gpus-per-client to train on the CPU with --backend local")
    return backend


def _ray_config(*, cpus: float, gpus: float, ray_address: str | None, ray_temp_dir: str | None,
                verbose: bool) -> dict[str, Any]:
    from .ray_local import loopback_init_args

    # Client failures come back to the server as error replies (and are reported there), so the actors' own
    # logs only reach the terminal with --verbose.
    init_args: dict[str, Any] = {
        "include_dashboard": False, "configure_logging": True, "logging_level": logging.WARNING,
        "log_to_driver": verbose,
    }
    if ray_address:
        init_args["address"] = ray_address
    else:  # a Ray of our own: on 127.0.0.1 only (see ray_local)
        init_args.update(loopback_init_args())
    if ray_temp_dir:
        init_args["_temp_dir"] = ray_temp_dir
    return {"client_resources": {"num_cpus": cpus, "num_gpus": gpus}, "init_args": init_args}


@contextmanager
def engine_backend(
    backend: str, *, client_app: ClientApp, num_clients: int, cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0, ray_address: str | None = None, ray_temp_dir: str | None = None,
    verbose: bool = False, dp_sgd: bool = True,
) -> Iterator[dict[str, Any]]:
    """Inside, ``run_simulation`` runs on ``backend``; yields the ``backend_config`` to pass it.

    Enter it in the thread that calls ``run_simulation``, as early as possible: the local backend forks its workers
    here (with Opacus already imported when ``dp_sgd``), and they warm up while the caller imports Flower's engine
    and builds the ServerApp.
    """
    if backend == "local":
        from .local_pool import forked_pool

        with forked_pool(client_app, num_clients=num_clients, cpus_per_client=cpus_per_client, dp_sgd=dp_sgd) as pool:
            from .local_backend import local_backend  # Flower's engine: imported while the workers warm up

            with local_backend(pool):
                yield {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}}
        return
    from .ray_local import loopback_ray

    config = _ray_config(cpus=cpus_per_client, gpus=gpus_per_client, ray_address=ray_address,
                         ray_temp_dir=ray_temp_dir, verbose=verbose)
    with nullcontext() if ray_address else loopback_ray():
        yield config
