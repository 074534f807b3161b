"""The simulation engine's dispatch loop (``vce_api.add_messages_to_queue``), the in-memory state it reads, the
in-memory grid ``run_simulation`` builds, and the backend the engine runs ClientApps on (``vce_api.run_api``'s
``backend_fn``, which always builds ``RayBackend`` in Flower 1.39).

:func:`swap_dispatch_loop`, :func:`swap_link_hooks` and :func:`swap_backend` replace Flower's pieces for the
duration of a ``with`` block only (never on import), and restore whatever was there before, under a lock, so
concurrent simulations in one process stay consistent.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flwr.clientapp.client_app import ClientAppException as ClientAppException
from flwr.server.superlink.fleet.vce import vce_api
from flwr.server.superlink.fleet.vce.backend.backend import Backend as Backend
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState as InMemoryLinkState
from flwr.superlink.grid import InMemoryGrid as InMemoryGrid
from flwr.supercore.date import now as now

__all__ = ["FLOWER_POLL_S", "Backend", "ClientAppException", "InMemoryGrid", "InMemoryLinkState",
           "check_stored_messages", "flower_dispatch_loop", "flower_run_api", "now", "run_simulation_module",
           "swap_backend", "swap_dispatch_loop", "swap_link_hooks"]

#: Flower's sweep interval (``f_stop.wait(0.1)`` in ``add_messages_to_queue``).
FLOWER_POLL_S = 0.1
#: Flower's own loop as imported, for states the replacement does not handle.
flower_dispatch_loop: Callable[..., None] = vce_api.add_messages_to_queue
#: Flower's engine runner as imported: ``run_api(app_fn, backend_fn, nodes_mapping, state_factory, node_info_stores,
#: f_stop, metrics)``, called by ``start_vce`` through the module at call time.
flower_run_api: Callable[..., None] = vce_api.run_api
_swap_lock = threading.Lock()
#: The module, not the function ``flwr.simulation`` re-exports under the same name: it looks ``InMemoryGrid`` up
#: at call time, so swapping the module attribute takes effect.
run_simulation_module = importlib.import_module("flwr.simulation.run_simulation")


def check_stored_messages(state: InMemoryLinkState, message_ids: set[Any]) -> None:
    """Flower's TTL and federation check on stored messages (drops expired / out-of-federation ones)."""
    state._check_stored_messages(message_ids)


@contextmanager
def swap_dispatch_loop(replacement: Callable[..., None]) -> Iterator[None]:
    """Run Flower's simulation engine with ``replacement`` as its dispatch loop inside this block."""
    with _swap_lock:
        previous = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = replacement
    try:
        yield
    finally:
        with _swap_lock:
            vce_api.add_messages_to_queue = previous


@contextmanager
def swap_link_hooks(
    *, wrap_store_ins: Callable[[Callable[..., Any]], Callable[..., Any]],
    wrap_store_res: Callable[[Callable[..., Any]], Callable[..., Any]], grid_class: type[InMemoryGrid],
) -> Iterator[None]:
    """Inside this block ``InMemoryLinkState.store_message_ins`` / ``store_message_res`` are the wrappers of Flower's
    own that ``wrap_store_ins`` / ``wrap_store_res`` return, and ``run_simulation`` builds ``grid_class`` (a subclass
    of Flower's ``InMemoryGrid``) for the ServerApp; all restored afterwards."""
    with _swap_lock:
        saved = (InMemoryLinkState.store_message_ins, InMemoryLinkState.store_message_res,
                 run_simulation_module.InMemoryGrid)
        InMemoryLinkState.store_message_ins = wrap_store_ins(saved[0])  # type: ignore[method-assign]
        InMemoryLinkState.store_message_res = wrap_store_res(saved[1])  # type: ignore[method-assign]
        run_simulation_module.InMemoryGrid = grid_class
    try:
        yield
    finally:
        with _swap_lock:
            (InMemoryLinkState.store_message_ins, InMemoryLinkState.store_message_res,  # type: ignore[method-assign]
             run_simulation_module.InMemoryGrid) = saved


@contextmanager
def swap_backend(backend_fn: Callable[[], Backend]) -> Iterator[None]:
    """Inside this block Flower's simulation engine runs its ClientApps on what ``backend_fn`` builds, not Ray.

    Why here: Flower 1.39 hard-codes ``RayBackend`` in ``start_vce``'s local ``backend_fn``; the only seam is
    ``vce_api.run_api``, which receives that factory and which ``start_vce`` looks up in the module when called.
    The wrapper passes every other argument through unchanged, so the engine (queues, node contexts, error replies)
    is Flower's own. Like the other swaps it is process-wide while the block runs: one simulation at a time.
    """
    with _swap_lock:
        previous = vce_api.run_api

        def run_api(app_fn: Any, _flower_backend_fn: Any, *args: Any, **kwargs: Any) -> None:
            previous(app_fn, backend_fn, *args, **kwargs)

        vce_api.run_api = run_api
    try:
        yield
    finally:
        with _swap_lock:
            vce_api.run_api = previous
