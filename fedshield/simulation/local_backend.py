"""The local simulation backend: Flower's engine runs ClientApps on a pool of forked worker processes, not on Ray.

Why: Ray's start (GCS, raylet, workers importing torch) costs 10-30 s on a small machine, more than a whole
small simulation. Everything else stays Flower's: its engine registers the nodes, keeps each node's ``Context``
(``DeprecatedRunInfoStore``), queues the messages and turns a raised ClientApp into its error reply; only the
``Backend`` that runs one ``(Message, Context)`` differs (:func:`fedshield.flower_internals.simulation.swap_backend`).
The workers themselves are :class:`fedshield.simulation.local_pool.LocalPool`'s, forked before this module (and
Flower's engine with it) is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..errors import FedshieldError
from ..flower_internals.simulation import Backend, ClientAppException, swap_backend
from .local_pool import ClientAppRaised, LocalPool

__all__ = ["LocalBackend", "local_backend"]


class LocalBackend(Backend):
    """Flower's ``Backend`` contract over a :class:`LocalPool` (the pool belongs to :func:`local_backend`)."""

    def __init__(self, pool: LocalPool) -> None:
        super().__init__({})
        self._pool = pool

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        if app_fn() is not self._pool.app:
            raise FedshieldError("the local backend's workers were forked with another ClientApp than the one the "
                                 "simulation runs: pass the same ClientApp to local_backend() and run_simulation()")

    @property
    def num_workers(self) -> int:
        return self._pool.size

    def is_worker_idle(self) -> bool:
        return self._pool.has_idle()

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        try:
            return self._pool.run(message, context)
        except ClientAppRaised as exc:  # Flower's engine turns this one into the node's error reply
            raise ClientAppException(str(exc)) from exc

    def terminate(self) -> None:
        self._pool.close()


@contextmanager
def local_backend(pool: LocalPool) -> Iterator[LocalPool]:
    """Inside, ``run_simulation`` runs the ClientApp on ``pool``'s workers (the pool's owner closes it).

    Enter it in the thread that will call ``run_simulation``, before the call.
    """
    with swap_backend(lambda: LocalBackend(pool)):
        yield pool
