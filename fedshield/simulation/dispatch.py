"""One-pass message dispatch for Flower's simulation engine, so a round costs O(messages), not O(nodes x messages).

Flower 1.39's engine (``flwr.server.superlink.fleet.vce.vce_api.add_messages_to_queue``) finds work for its
virtual clients every 0.1 s by calling ``InMemoryLinkState.get_message_ins(node_id, limit=1)`` once per node, and
each call walks the whole message store, checking every message's TTL and federation, under the state's lock. With
N nodes and M messages in flight that is N x M checks per sweep: at N = 10,000 and an evaluate round's M = 10,000,
10^8 checks per 0.1 s tick, with the lock held, so the ServerApp's own pulls and the clients' replies wait too.

:func:`take_undelivered` does what those N calls do in one walk: at most one undelivered message per node per
sweep (Flower's ``limit=1``), the same TTL and federation checks on each candidate (Flower's
``_check_stored_messages``, which drops expired ones), marked delivered under the lock. A message already delivered
is not checked again here; its expiry is still handled where Flower handles replies (``get_message_res``).
:func:`one_pass_dispatch` swaps it in for the duration of a ``run_simulation`` call, and only for the in-memory
state the simulation engine uses; any other state gets Flower's own function.
"""

from __future__ import annotations

import threading
from collections.abc import Container, Iterator
from contextlib import contextmanager
from queue import Queue
from typing import Any

from flwr.app import Message

from ..flower_internals.simulation import (
    FLOWER_POLL_S,
    InMemoryLinkState,
    check_stored_messages,
    flower_dispatch_loop,
    now,
    swap_dispatch_loop,
)

from .wake import instructions_signal

__all__ = ["take_undelivered", "one_pass_dispatch", "POLL_S"]

#: Flower's sweep interval (``f_stop.wait(0.1)`` in ``add_messages_to_queue``), kept as the fallback: the loop
#: wakes as soon as an instruction is stored (:mod:`fedshield.simulation.wake`), and at least this often.
POLL_S = FLOWER_POLL_S


def take_undelivered(state: InMemoryLinkState, nodes: Container[int]) -> list[Message]:
    """At most one not-yet-delivered, still-valid message per node in ``nodes``, marked delivered."""
    with state.lock:
        candidates = [mid for mid, msg in state.message_ins_store.items()
                      if msg.metadata.delivered_at == "" and msg.metadata.dst_node_id in nodes]
        if not candidates:
            return []
        check_stored_messages(state, set(candidates))  # drops expired / out-of-federation messages, as Flower does
        taken: list[Message] = []
        seen: set[int] = set()
        for mid in candidates:
            msg = state.message_ins_store.get(mid)
            if msg is not None and msg.metadata.dst_node_id not in seen:
                seen.add(msg.metadata.dst_node_id)
                taken.append(msg)
        stamp = now().isoformat()
        for msg in taken:
            msg.metadata.delivered_at = stamp
    return taken


def _add_messages_to_queue(state: Any, queue: Queue[Message], nodes_mapping: Any, f_stop: threading.Event) -> None:
    """Drop-in for ``vce_api.add_messages_to_queue`` (same arguments, same loop, one walk per sweep).

    While it runs, a thread that ends a batch of stores (the ServerApp's push: :mod:`fedshield.simulation.wake`)
    queues the batch itself with the same walk; the state's lock keeps any message from being taken twice."""
    if not isinstance(state, InMemoryLinkState):
        flower_dispatch_loop(state, queue, nodes_mapping, f_stop)
        return
    arrived = instructions_signal(state)

    def sweep() -> bool:
        taken = take_undelivered(state, nodes_mapping)
        for msg in taken:
            queue.put(msg)
        return bool(taken)

    arrived.hand_over_with(sweep)
    try:
        while not f_stop.is_set():
            seen = arrived.generation  # read before the walk: a message stored during it ends the wait at once
            if not sweep():  # a node's next message (Flower: limit 1 per sweep) goes out in the next sweep, at once
                arrived.wait_past(seen, POLL_S)  # wakes on a stored instruction; POLL_S still bounds the stop check
    finally:
        arrived.hand_over_with(None)


@contextmanager
def one_pass_dispatch() -> Iterator[None]:
    """Use :func:`take_undelivered` in Flower's simulation engine inside this block (restored afterwards)."""
    with swap_dispatch_loop(_add_messages_to_queue):
        yield
