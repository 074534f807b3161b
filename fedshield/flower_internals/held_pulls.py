"""A SuperLink that answers an empty pull when there is something to answer, not at once (long polling).

Flower 1.39's SuperLink answers every pull at once, empty or not, so its clients poll: a SuperNode asks for its next
instruction every 0.2-0.5 s (fedshield's capped sleeps, :mod:`fedshield.deploy.supernode_main`) and the ServerApp
asks for replies every 0.05-0.2 s (:class:`fedshield.strategies.streaming.StreamingGrid`). Traced on 3 sites
(2026-12-05), each message waited for the next poll: a SecAgg+ UNMASK stage took 0.52 s for 15 ms of work per site,
two of the three sites picking the message up 0.2 s after it was stored. And every poll is an authenticated request
with a handful of SQL queries in the SuperLink.

:func:`hold_empty_pulls` makes pulls that find nothing wait, in the SuperLink process, for up to ``hold_s`` seconds:

* a SuperNode's Fleet ``PullMessages`` waits until the Runtime API stores an instruction for that node (the
  ServerApp's ``push-messages``), and a node's ``PullObject`` for an object of it the ServerApp has not pushed yet
  waits until it is pushed;
* the ServerApp's Runtime ``pull-messages`` waits until the Fleet API stores a reply for that run (a SuperNode's
  ``PushMessages``), and its ``pull-object`` for an object of a reply until the node has pushed it.

Either way the answer is Flower's own handler's: the wait only decides when it is asked. A held pull that times out
answers the empty result it already has. A caller (a node; a run's ServerApp) holds at most one pull per topic and
:data:`PER_CALLER` in all, and at most ``max_held`` are held, so a node that opens many pulls, or a crowd of idle
nodes, gets Flower's immediate answers for the rest and cannot take the server's worker threads (the Fleet server
has 1000, uvicorn's thread pool 40): the worst case is the polling of before. A Fleet pull whose client went away
(cancelled, reset, past its deadline) while held is not pulled again, so no instruction is claimed for it; a
connection that died silently still looks alive to gRPC, and an instruction stored during the last second of its
hold is then claimed for nobody, as one pulled just before a silent death always was (Flower has no delivery
acknowledgement for that pull); the round then waits for that node as for any node that went away. A held Runtime
reply pull whose ServerApp went away is pulled again, and Flower deletes what it answers: that run has stopped.

Some pulls are ended by no push and wait their whole hold: a reply the SuperLink itself makes up when it is read (a
message's TTL passed, its node went offline), an object whose push session expired, an instruction for the
SuperLink's own node. They are answered after ``hold_s``, as before; a ServerApp's round timeout may so be overrun by
up to ``hold_s``. Clients need nothing: a held pull looks like a slow one. fedshield's SuperNode and ServerApp pull
again at once after an empty pull that took about ``hold_s``, instead of sleeping first.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["FLEET_SERVICER", "MESSAGE_HANDLER", "PER_CALLER", "RUNTIME_HANDLERS", "Arrivals", "hold_empty_pulls"]

#: Flower 1.39's Fleet gRPC servicer; grpc binds its methods when the server is built, so patch before that.
FLEET_SERVICER = "flwr.server.superlink.fleet.grpc_rere.fleet_servicer:FleetServicer"
#: The Fleet handlers module, whose ``push_messages`` stores a node's replies (looked up per call by the servicer).
MESSAGE_HANDLER = "flwr.server.superlink.fleet.message_handler.message_handler"
#: The Runtime API handlers module (``app.state.runtime_handlers``; the router looks up each handler per request).
RUNTIME_HANDLERS = "flwr.superlink.servicer.runtime.runtime_handlers"
_WRAPPED = "__fedshield_held__"
#: Pulls one caller may have held at once: its next message, and two of that message's objects.
PER_CALLER = 3


class Arrivals:
    """Who waits for what: one event per held pull, under the topic it waits for (``("ins", node_id)``: a node's next
    instruction; ``("res", run_id)``: a run's next reply; ``("obj", object_id)``: an object still being pushed) and
    its caller (the node, or the run's ServerApp). A caller holds at most one pull per topic and ``per_caller`` in
    all (Flower's clients pull a message, then its objects two at a time), and ``max_held`` are held at most."""

    def __init__(self, max_held: int, per_caller: int = PER_CALLER) -> None:
        self.max_held, self.per_caller = max_held, per_caller
        self._lock = threading.Lock()
        self._waiting: dict[Hashable, dict[Hashable, threading.Event]] = {}
        self._by_caller: dict[Hashable, int] = {}
        self._held = 0

    @contextmanager
    def watch(self, topic: Hashable, caller: Hashable) -> Iterator[threading.Event | None]:
        """An event set when :meth:`notify` names ``topic``; None when this pull may not be held (the caller already
        holds one on this topic or ``per_caller`` in all, or ``max_held`` are held). Watch *before* pulling, so
        nothing stored during the pull is missed."""
        event: threading.Event | None = threading.Event()
        with self._lock:
            callers = self._waiting.get(topic, {})
            mine = self._by_caller.get(caller, 0)
            if caller in callers or mine >= self.per_caller or self._held >= self.max_held:
                event = None
            else:
                self._waiting.setdefault(topic, {})[caller] = event  # type: ignore[assignment]
                self._by_caller[caller] = mine + 1
                self._held += 1
        try:
            yield event
        finally:
            if event is not None:
                self._forget(topic, caller)

    def _forget(self, topic: Hashable, caller: Hashable) -> None:
        with self._lock:
            callers = self._waiting[topic]
            del callers[caller]
            if not callers:
                del self._waiting[topic]
            self._by_caller[caller] -= 1
            if not self._by_caller[caller]:
                del self._by_caller[caller]
            self._held -= 1

    def notify(self, topics: Iterable[Hashable]) -> None:
        with self._lock:
            events = [e for t in set(topics) for e in self._waiting.get(t, {}).values()]
        for event in events:
            event.set()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held


def _held(pull: Callable[..., Any], arrivals: Arrivals, key: Callable[[Any], tuple[Hashable, Hashable]],
          empty: Callable[[Any], bool], still_wanted: Callable[[Any], bool], hold_s: float,
          holdable: Callable[[Any], bool] | None = None) -> Callable[..., Any]:
    """``pull`` that, when it answers ``empty``, waits up to ``hold_s`` for :meth:`Arrivals.notify` and pulls again
    (if the caller ``still_wanted`` it); a call that is not ``holdable`` is passed through. ``key`` (the topic and
    the caller), ``still_wanted`` and ``holdable`` get the call's arguments by name."""
    signature = inspect.signature(pull)

    @functools.wraps(pull)
    def held_pull(*args: Any, **kwargs: Any) -> Any:
        named = signature.bind(*args, **kwargs).arguments
        if holdable is not None and not holdable(named):
            return pull(*args, **kwargs)
        with arrivals.watch(*key(named)) as arrived:
            response = pull(*args, **kwargs)
            if arrived is None:
                return response
            deadline = time.monotonic() + hold_s
            # A wake that finds nothing (a push that stored nothing: a bogus or late reply) waits on, but never past
            # the deadline, however many such pushes come.
            while empty(response):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not arrived.wait(remaining) or not still_wanted(named):
                    break
                arrived.clear()  # before the pull: a push during it sets the event again
                response = pull(*args, **kwargs)
            return response

    setattr(held_pull, _WRAPPED, True)
    return held_pull


def _notifying(push: Callable[..., Any], arrivals: Arrivals, keys: Callable[[Any], Iterable[Hashable]],
               stored: Callable[[Any], bool] = lambda response: True) -> Callable[..., Any]:
    """``push`` that, once it has stored its messages, wakes the pulls waiting for them: also when it raised after
    storing some of them (a batch), never when its answer says nothing was ``stored``."""
    signature = inspect.signature(push)

    @functools.wraps(push)
    def push_and_notify(*args: Any, **kwargs: Any) -> Any:
        response = None
        try:
            response = push(*args, **kwargs)
            return response
        finally:
            if response is None or stored(response):
                arrivals.notify(keys(signature.bind(*args, **kwargs).arguments["request"]))

    setattr(push_and_notify, _WRAPPED, True)
    return push_and_notify


def hold_empty_pulls(hold_s: float = 1.0, max_held: int = 256) -> tuple[Arrivals, Arrivals]:
    """Install the held pulls in this (SuperLink) process, before Flower builds its servers; returns the Fleet's
    and the Runtime API's :class:`Arrivals`. Idempotent. Raises ``AttributeError``/``ImportError`` if Flower's
    modules moved, ``TypeError`` if a handler no longer takes what is read here (the caller then keeps Flower's
    immediate answers)."""
    from flwr.server.superlink.fleet.grpc_rere.fleet_servicer import FleetServicer
    from flwr.server.superlink.fleet.message_handler import message_handler as fleet_api
    from flwr.superlink.servicer.runtime import runtime_handlers as runtime_api

    pieces = {(FleetServicer, "PullMessages"): _FLEET_PULL_ARGS, (fleet_api, "pull_object"): ("request",),
              (fleet_api, "push_messages"): ("request",), (fleet_api, "push_object"): ("request",),
              (runtime_api, "pull_messages"): _RUNTIME_ARGS, (runtime_api, "pull_object"): _RUNTIME_ARGS,
              (runtime_api, "push_messages"): ("request",), (runtime_api, "push_object"): ("request",)}
    if all(getattr(getattr(owner, name), _WRAPPED, False) for owner, name in pieces):
        return _INSTALLED[0], _INSTALLED[1]
    _check_arguments(pieces)
    fleet, runtime = Arrivals(max_held), Arrivals(min(max_held, RUNTIME_MAX_HELD))
    no_messages, unavailable = (lambda r: not r.messages_list), (lambda r: r.object_found and not r.object_available)
    node_still_there, anyway = (lambda a: a["context"].is_active()), (lambda a: True)

    def node_of(a: Any) -> int:
        return int(a["request"].node.node_id)

    replaced = {
        # A node's pull for its next instruction, and for an object of it the ServerApp is still pushing.
        (FleetServicer, "PullMessages"): _held(FleetServicer.PullMessages, fleet, lambda a: (("ins", node_of(a)),
                                               node_of(a)), no_messages, node_still_there, hold_s),
        (fleet_api, "pull_object"): _held(fleet_api.pull_object, fleet, lambda a: (("obj", a["request"].object_id),
                                          node_of(a)), unavailable, anyway, hold_s),
        # The ServerApp's pull for its run's next reply, and for an object of it a node is still pushing.
        (runtime_api, "pull_messages"): _held(runtime_api.pull_messages, runtime, lambda a: (("res", a["task"].run_id),
                                              a["task"].run_id), no_messages, anyway, hold_s, holdable=_pulls_again),
        (runtime_api, "pull_object"): _held(runtime_api.pull_object, runtime, lambda a: (
            ("obj", a["request"].object_id), a["task"].run_id), unavailable, anyway, hold_s),
        # What wakes them: the ServerApp storing instructions and their objects, a node storing replies and theirs.
        (runtime_api, "push_messages"): _notifying(runtime_api.push_messages, fleet, lambda r: [
            ("ins", m.metadata.dst_node_id) for m in r.messages_list]),
        (runtime_api, "push_object"): _notifying(runtime_api.push_object, fleet, lambda r: [("obj", r.object_id)],
                                                 stored=lambda response: bool(response.stored)),
        # Flower's Fleet handler stores a node's first message only: only its run is woken.
        (fleet_api, "push_messages"): _notifying(fleet_api.push_messages, runtime, lambda r: [
            ("res", m.metadata.run_id) for m in r.messages_list[:1]]),
        (fleet_api, "push_object"): _notifying(fleet_api.push_object, runtime, lambda r: [("obj", r.object_id)],
                                               stored=lambda response: bool(response.stored)),
    }
    for (owner, name), wrapper in replaced.items():
        setattr(owner, name, wrapper)
    _INSTALLED[:] = [fleet, runtime]
    return fleet, runtime


def _check_arguments(pieces: dict[tuple[Any, str], tuple[str, ...]]) -> None:
    """``TypeError`` naming the first handler that no longer takes the arguments the wrappers read."""
    for (owner, name), args in pieces.items():
        if not set(args) <= set(inspect.signature(getattr(owner, name)).parameters):
            raise TypeError(f"{owner.__name__}.{name} no longer takes {', '.join(args)}")


def _pulls_again(named: Any) -> bool:
    """Whether this run's ServerApp pulls again at once after a held pull: fedshield's (``StreamingGrid``) does.
    Flower's own ``Grid.send_and_receive`` sleeps 3 s after every pull, so holding its pull only delays it (measured:
    Flower's echo app 4.8 s a round at 3 sites, against 3.6 s answered at once). Told by the run's app id, which never
    changes (cached per run)."""
    run_id = named["task"].run_id
    if run_id not in _FEDSHIELD_RUN:
        try:
            runs = named["state"].get_run_info(run_ids=[run_id])
        except Exception:  # noqa: BLE001  Flower's state moved: answer at once, as Flower does (never fail the pull)
            return False
        if not runs:
            return False  # not cached: a run not stored yet is asked again next time
        _FEDSHIELD_RUN[run_id] = str(runs[0].fab_id) in FEDSHIELD_APPS
    return _FEDSHIELD_RUN[run_id]


#: fedshield's app ids (``publisher/name``): the bundle ``fedshield server`` submits (``fedshield/flower_app``) and
#: the repository's own ``pyproject.toml`` (``flwr run .``). Our test apps share the publisher, not the name.
FEDSHIELD_APPS = frozenset({"fedshield/fedshield-app", "fedshield/fedshield"})
_FEDSHIELD_RUN: dict[int, bool] = {}
#: What the wrappers read from each handler's arguments.
_FLEET_PULL_ARGS = ("request", "context")
_RUNTIME_ARGS = ("request", "state", "task")
#: uvicorn runs the Runtime API's handlers in a pool of 40 threads: hold few of them (a run's ServerApp pulls its
#: replies, then their objects two at a time).
RUNTIME_MAX_HELD = 8
_INSTALLED: list[Arrivals] = []
