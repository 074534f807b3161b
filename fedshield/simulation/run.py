"""``fedshield simulate``: the same ServerApp and ClientApp on Flower's simulation engine.

Many virtual clients share this machine; each gets its partition of the bundled data from its ``partition-id``.
The engine runs the ClientApps on forked local workers (``--backend local``,
:mod:`fedshield.simulation.local_backend`) or on Ray (``--backend ray``): with ``ray_address`` on an existing Ray
cluster, without it on a local Ray that listens on 127.0.0.1 only (:mod:`fedshield.simulation.ray_local`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from ..config import RunConfig
from ..errors import ConfigError, FedshieldError
from ..server.checkpoint import Checkpoint, load_resume
from ..server.records import RoundRecord, RunSummary
from .engine import choose_backend

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

__all__ = ["simulate", "preflight", "check_client_resources", "load_resume"]

log = logging.getLogger(__name__)


def preflight(config: RunConfig) -> None:
    """Fail before Ray starts: unknown task, an impossible partition, an unwritable output directory."""
    from ..client.site import bundled_split
    from ..tasks import get_task

    task = get_task(config.task)
    if task.load_bundled is None and not config.data:
        raise ConfigError(f"task {config.task!r} ships no data: pass your data set to simulate with --data FILE")
    bundled_split(config.task, str(config.partition), config.num_clients, config.seed, config.data,
                  config.text_column, config.label_column)
    from ..strategies.registry import validate_params

    validate_params(config.strategy, config.strategy_params, clients_per_round=config.expected_train_clients)
    _check_writable(config)


def check_client_resources(
    config: RunConfig, *, cpus_per_client: float, gpus_per_client: float, ray_address: str | None = None
) -> None:
    """Fail before Ray starts on resources it could never grant: Ray would wait for them instead of failing.

    Ray accepts GPU shares in [0, 1] or whole GPUs, and hides every GPU from a client that reserves none. Without
    ``ray_address`` the GPUs are this machine's, as torch sees them; a cluster's are not checked here.
    """
    cpus, gpus = cpus_per_client, gpus_per_client
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not (cpus > 0 and math.isfinite(cpus)):
        raise ConfigError(f"--cpus-per-client must be a number > 0, got {cpus!r}: e.g. --cpus-per-client 1")
    if isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or not (
        0 <= gpus <= 1 or (math.isfinite(gpus) and float(gpus).is_integer())
    ):
        raise ConfigError(
            f"--gpus-per-client must be a share of one GPU in [0, 1] (e.g. 0.25: four clients per GPU) or a whole "
            f"number of GPUs, got {gpus!r}: Ray cannot grant fractions above 1"
        )
    if gpus == 0 and config.device.startswith("cuda"):
        raise ConfigError(
            f"--device {config.device} but --gpus-per-client 0: Ray hides the GPUs from virtual clients that reserve "
            "none, so every client would fail. Add --gpus-per-client 0.5 (two clients per GPU) or 1, or use "
            "--device auto (falls back to the CPU)"
        )
    if gpus > 0 and ray_address is None:
        _check_local_gpus(gpus)


def _check_local_gpus(gpus: float) -> None:
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise ConfigError(
            f"--gpus-per-client {gpus:g} reserves a GPU share for every virtual client, but torch ({build}) sees no "
            "CUDA GPU on this machine, so Ray could never start a client: drop --gpus-per-client (clients train on "
            "the CPU), or run on a machine with an NVIDIA GPU and a CUDA build of torch (or pass --ray-address of a "
            "cluster that has GPUs)"
        )
    if gpus > count:
        raise ConfigError(
            f"--gpus-per-client {gpus:g} asks for more GPUs per client than this machine has ({count}): use at most "
            f"{count}, or a share such as 0.5"
        )


def _check_writable(config: RunConfig) -> None:
    out = config.out
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run directory {out}: {existing} is not a writable directory; choose another --out")
    if out.exists() and any(out.glob("*")) and not (out / "config.json").exists():
        raise ConfigError(f"--out {out} exists and is not a fedshield run directory: choose an empty or new directory")


def simulate(
    config: RunConfig,
    *,
    resume: Checkpoint | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    cpus_per_client: float = 1.0,
    gpus_per_client: float = 0.0,
    ray_address: str | None = None,
    ray_temp_dir: str | None = None,
    verbose: bool = False,
    backend: str | None = None,
) -> RunSummary:
    """Run ``config`` on Flower's simulation engine; ``backend`` ``local`` | ``ray`` (see
    :mod:`fedshield.simulation.engine`; ``None``: ``ray`` with ``ray_address`` or GPU shares, else the default)."""
    backend = choose_backend(backend, ray_address=ray_address, gpus_per_client=gpus_per_client)
    preflight(config)
    check_client_resources(
        config, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client, ray_address=ray_address
    )
    from ..client.app import app as client_app
    from .engine import engine_backend
    from .reaper import reap_on_exit

    results: list[RunSummary] = []
    errors: list[BaseException] = []
    # The backend first: the local one forks its workers now, and they warm up while this process imports Flower's
    # engine and builds the ServerApp (in _run_engine).
    engine = engine_backend(backend, client_app=client_app, num_clients=config.num_clients,
                            cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client,
                            ray_address=ray_address, ray_temp_dir=ray_temp_dir, verbose=verbose, dp_sgd=config.dp)
    with reap_on_exit(), engine as backend_config:
        server_app = _server_app(config, on_round=on_round, results=results, errors=errors, resume=resume)
        _run_engine(config, server_app, client_app, backend_config)
    if errors:
        raise errors[0]
    if not results:
        raise FedshieldError("the simulation ended without a result; run with --verbose to see Flower's log")
    return results[0]


def _server_app(config: RunConfig, *, on_round: Callable[[RoundRecord], None] | None, results: list[RunSummary],
                errors: list[BaseException], resume: Checkpoint | None) -> ServerApp:
    from ..server.app import build_server_app

    state_root = str((config.out / "clients").resolve())
    # No background client-level accountant: the simulation keeps every core busy (see RunReporter).
    return build_server_app(config, on_round=on_round, result=results, errors=errors, state_root=state_root,
                            resume=resume, accounting_ahead=False)


def _run_engine(config: RunConfig, server_app: ServerApp, client_app: ClientApp, backend_config: dict[str, Any]
                ) -> None:
    """Flower's ``run_simulation``, with fedshield's event-driven dispatch unless ``--dispatch flower``."""
    from flwr.simulation import run_simulation

    from .dispatch import one_pass_dispatch
    from .wake import event_driven_link

    # Flower's own dispatch walks every message once per node (O(N x M) a sweep) and polls on fixed ticks;
    # --dispatch flower keeps both (the escape hatch if a Flower upgrade breaks ours).
    ours = config.dispatch == "fedshield"
    with one_pass_dispatch() if ours else nullcontext(), event_driven_link() if ours else nullcontext():
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.num_clients,
                       backend_config=backend_config)
