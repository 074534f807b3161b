"""The fedshield ServerApp, for ``flwr run`` (settings from ``[tool.flwr.app.config]`` / ``--run-config``) and,
through :func:`build_server_app`, for ``fedshield simulate`` and ``fedshield server`` (settings from the CLI)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from ..config import RunConfig
from ..protocol import RESUME_KEY
from ..known_warnings import ignore_known_harmless
from ..flower_internals.serverapp import quicken_serverapp_pulls
from ..orphan_guard import exit_when_orphaned
from .checkpoint import Checkpoint, load_checkpoint
from .nodes import NodeWaitTimeout, wait_for_nodes
from .plan import calibrate_run
from .runner import RoundRecord, RunSummary, run_server

__all__ = ["RESUME_KEY", "app", "build_server_app", "read_run_config"]

app = ServerApp()




def read_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, bool]:
    """What a deployed ServerApp is asked to do: the run's settings, and whether to resume ``out``."""
    values = dict(run_config)
    resume = values.pop(RESUME_KEY, False) is True
    return RunConfig.from_mapping(values, zero_is_unset=True), resume


@app.main()
def main(grid: Grid, context: Context) -> None:
    exit_when_orphaned()  # this process is Flower's flwr-serverapp, a child of the SuperLink
    ignore_known_harmless()
    quicken_serverapp_pulls(grid)  # deployment: a reply's late object is retried in 0.02 s, not 1 s
    config, resume = read_run_config(context.run_config)
    checkpoint = load_checkpoint(config.out) if resume else None
    noise = calibrate_run(config) if checkpoint is None else None  # while the sites start, not after
    try:
        wait_for_nodes(grid, config.num_clients, timeout=config.node_wait_timeout)
    except NodeWaitTimeout as exc:  # one line the operator can act on, above Flower's traceback
        log(logging.ERROR, "%s", exc)
        raise
    run_server(grid, config, state_root=str(config.out / "clients"), resume=checkpoint, noise=noise)


def build_server_app(
    config: RunConfig,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    result: list[RunSummary] | None = None,
    errors: list[BaseException] | None = None,
    state_root: str = "",
    resume: Checkpoint | None = None,
    accounting_ahead: bool = True,
) -> ServerApp:
    """A ServerApp bound to ``config``. Flower runs it in a thread and only logs its exceptions, so they are
    handed back through ``errors`` for the caller to re-raise. ``accounting_ahead``: see
    :class:`~fedshield.server.reporter.RunReporter`."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            wait_for_nodes(grid, config.num_clients, timeout=config.node_wait_timeout)
            summary = run_server(grid, config, on_round=on_round, state_root=state_root, resume=resume,
                                 accounting_ahead=accounting_ahead)
        except BaseException as exc:  # handed back to the caller's thread, which re-raises it
            if errors is not None:
                errors.append(exc)
            raise
        if result is not None:
            result.append(summary)

    return server_app
