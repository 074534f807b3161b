"""Run several fedshield runs inside ONE Flower simulation (one Ray start), for end-to-end tests that compare runs.

Each run is a full :func:`fedshield.server.runner.run_server` with its own config, run directory, strategy and
client ledgers; they share the simulated SuperNodes, so every config must have the same ``num_clients``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedshield.config import RunConfig
from fedshield.server.runner import RunSummary, run_server
from fedshield.simulation.dispatch import one_pass_dispatch
from fedshield.simulation.engine import choose_backend, engine_backend
from fedshield.simulation.reaper import reap_on_exit
from fedshield.simulation.wake import event_driven_link


def run_many(
    configs: list[RunConfig], *, client_app: ClientApp | None = None, wrap_grid: Any = None,
    cpus_per_client: float = 1.0, wrap_grids: list[Any] | None = None,
    failures: dict[int, BaseException] | None = None, backend: str | None = None,
) -> list[RunSummary | None]:
    """``wrap_grid``: optional ``Grid -> Grid`` applied to the server's grid (e.g. to record every reply).
    ``cpus_per_client``: CPUs per simulated client; below 1 runs more workers (Ray actors) than cores, for tests in
    which one client deliberately holds its worker (a client slower than the round timeout).
    ``wrap_grids``: one optional ``Grid -> Grid`` per config (after ``wrap_grid``), for a batch of unrelated runs
    of which only some record their replies.
    ``failures``: keep going after a run fails: its exception goes here under its index and its summary is
    ``None``, so one failing run of a shared batch (``tests/_sim_batch.py``) fails only the tests that read it.
    Without it the first failure stops the simulation and is raised.
    ``backend``: ``local`` | ``ray`` (default: the product's, :data:`fedshield.simulation.engine.DEFAULT_BACKEND`)."""
    from flwr.simulation import run_simulation

    from fedshield.client.app import app as fedshield_client_app

    sizes = {c.num_clients for c in configs}
    if len(sizes) != 1:
        raise ValueError(f"all runs must have the same number of clients, got {sorted(sizes)}")
    if wrap_grids is not None and len(wrap_grids) != len(configs):
        raise ValueError(f"wrap_grids needs one entry per config ({len(configs)}), got {len(wrap_grids)}")
    results: list[RunSummary | None] = []
    errors: list[BaseException] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        try:
            for index, cfg in enumerate(configs):
                run_grid = wrap_grid(grid) if wrap_grid else grid
                if wrap_grids is not None and wrap_grids[index] is not None:
                    run_grid = wrap_grids[index](run_grid)
                try:
                    results.append(run_server(run_grid, cfg, state_root=str((cfg.out / "clients").resolve())))
                except Exception as exc:
                    if failures is None:
                        raise
                    failures[index] = exc
                    results.append(None)
        except BaseException as exc:  # Flower only logs ServerApp exceptions: hand it back
            errors.append(exc)
            raise

    from conftest import _children

    before = _children(os.getpid())
    app = client_app or fedshield_client_app
    engine = engine_backend(choose_backend(backend), client_app=app, num_clients=next(iter(sizes)),
                            cpus_per_client=cpus_per_client)
    # The same engine set-up as fedshield.simulation.run.simulate: the backend (forked local workers or a
    # loopback Ray), the one-pass dispatch and the event-driven link (rounds wait on messages, not on Flower's fixed
    # ticks), the reaper on exit.
    with reap_on_exit(), engine as backend_config, one_pass_dispatch(), event_driven_link():
        run_simulation(server_app=server_app, client_app=app, num_supernodes=sizes.pop(),
                       backend_config=backend_config)
    _assert_no_leftovers(before)
    if errors:
        raise errors[0]
    if len(results) != len(configs):
        raise RuntimeError(f"only {len(results)} of {len(configs)} runs finished; see Flower's log")
    return results


def _assert_no_leftovers(before: set[int]) -> None:
    """Module-scoped fixtures run before the per-test process check, so the simulation checks itself."""
    from conftest import _children

    deadline = time.monotonic() + 15
    left = _children(os.getpid()) - before
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = _children(os.getpid()) - before
    if left:
        raise AssertionError(f"the simulation left processes behind: {sorted(left)}")
