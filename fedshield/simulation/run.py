"""``fedshield simulate``: the same ServerApp and ClientApp on Flower's simulation engine (Ray).

Many virtual clients share this machine; each gets its partition of the bundled data from its ``partition-id``.
With ``ray_address`` the same run goes to an existing Ray cluster instead of a local one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError, FedshieldError
from ..server.checkpoint import Checkpoint
from ..server.runner import RoundRecord, RunSummary

__all__ = ["simulate", "preflight", "load_resume"]

log = logging.getLogger(__name__)


def preflight(config: RunConfig) -> None:
    """Fail before Ray starts: unknown task, an impossible partition, an unwritable output directory."""
    from ..client.site import _bundled_split
    from ..tasks import get_task

    task = get_task(config.task)
    if task.load_bundled is None:
        raise ConfigError(f"task {config.task!r} ships no data: simulate needs a task with bundled data")
    _bundled_split(config.task, str(config.partition), config.num_clients, config.seed)
    from ..strategies.registry import validate_params

    validate_params(config.strategy, config.strategy_params, clients_per_round=config.expected_train_clients)
    _check_writable(config)


def _check_writable(config: RunConfig) -> None:
    out = config.out
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run directory {out}: {existing} is not a writable directory; choose another --out")
    if out.exists() and any(out.glob("*")) and not (out / "config.json").exists():
        raise ConfigError(f"--out {out} exists and is not a fedshield run directory: choose an empty or new directory")


def load_resume(run_dir: Path) -> tuple[RunConfig, Checkpoint]:
    """The original settings and last checkpoint of ``run_dir``; the run continues exactly as configured."""
    import json

    from ..server.checkpoint import load_checkpoint

    run_dir = Path(run_dir)
    try:
        raw = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--resume {run_dir}: no config.json there; is it a fedshield run directory?") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume {run_dir}: config.json is unreadable ({exc})") from None
    config = RunConfig.from_mapping({**raw, "out": str(run_dir)})
    ckpt = load_checkpoint(run_dir)
    if ckpt.server_round > config.num_rounds:
        raise ConfigError(f"--resume {run_dir}: checkpoint is at round {ckpt.server_round} of {config.num_rounds}")
    return config, ckpt


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
) -> RunSummary:
    preflight(config)
    from flwr.simulation import run_simulation

    from ..client.app import app as client_app
    from ..server.app import build_server_app

    results: list[RunSummary] = []
    errors: list[BaseException] = []
    state_root = str((config.out / "clients").resolve())
    server_app = build_server_app(
        config, on_round=on_round, result=results, errors=errors, state_root=state_root, resume=resume
    )
    # Client failures come back to the server as error replies (and are reported there), so the actors' own
    # logs only reach the terminal with --verbose.
    init_args: dict[str, Any] = {
        "include_dashboard": False, "configure_logging": True, "logging_level": logging.WARNING,
        "log_to_driver": verbose,
    }
    if ray_address:
        init_args["address"] = ray_address
    if ray_temp_dir:
        init_args["_temp_dir"] = ray_temp_dir
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": gpus_per_client},
        "init_args": init_args,
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=config.num_clients, backend_config=backend_config)
    if errors:
        raise errors[0]
    if not results:
        raise FedshieldError("the simulation ended without a result; run with --verbose to see Flower's log")
    return results[0]
