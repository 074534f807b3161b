"""The simulation's hand-offs wake on a stored message, not on a tick: the engine's dispatcher hands out a message
stored after it went to sleep, the ServerApp's push hands its whole batch to the engine before it returns, and the
ServerApp's grid gets a reply stored after it went to sleep, all with the fallback interval set to a minute (a
tick-driven loop would fail these), on a real ``InMemoryLinkState``; and the patches live only inside
:func:`event_driven_link`."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from queue import Queue
from types import ModuleType, SimpleNamespace
from uuid import uuid4

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState
from flwr.superlink.grid import InMemoryGrid

from _benchmarks import load_benchmark

from fedshield.simulation import dispatch, wake
from fedshield.strategies.streaming import StreamingGrid

FALLBACK_S = 60.0  # long enough that only a wake-up can deliver within the test's waits

pytestmark = pytest.mark.usefixtures("restored_task_identity")


def _bench() -> ModuleType:
    return load_benchmark("sim_dispatch")


def _grid(state: InMemoryLinkState, kind: type[InMemoryGrid] = wake.SignalledInMemoryGrid) -> InMemoryGrid:
    grid = kind(state_factory=SimpleNamespace(state=lambda: state), pull_interval=FALLBACK_S)
    grid.set_run(state.run_ids[4242].run)
    return grid


def _messages(nodes: dict[int, int]) -> list[Message]:
    return [Message(RecordDict({"c": ConfigRecord({"i": i})}), nid, "train") for i, nid in enumerate(nodes)]


@contextmanager
def _dispatcher(state: InMemoryLinkState, nodes: dict[int, int]) -> Iterator[Queue[Message]]:
    """The engine's dispatch loop on its own thread, feeding the yielded queue; stopped (and checked) after."""
    queue: Queue[Message] = Queue()
    stop = threading.Event()
    sleeper = threading.Thread(target=dispatch._add_messages_to_queue, args=(state, queue, nodes, stop))
    sleeper.start()
    try:
        yield queue
    finally:
        stop.set()
        wake.instructions_signal(state).notify()  # the stop check runs on the next wake-up
        sleeper.join(FALLBACK_S)
    assert not sleeper.is_alive()


def test_dispatcher_wakes_on_a_stored_instruction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "POLL_S", FALLBACK_S)
    with wake.event_driven_link():
        state, nodes = _bench().build_state(4, 0)
        with _dispatcher(state, nodes) as queue:
            # Flower's own grid stores one by one (no batch): only the dispatcher's wake-up can hand these out.
            pushed = set(_grid(state, InMemoryGrid).push_messages(_messages(nodes)))
            handed = [queue.get(timeout=FALLBACK_S / 2) for _ in nodes]
    assert {m.metadata.message_id for m in handed} == pushed  # exactly the pushed messages, each once
    assert sorted(m.metadata.dst_node_id for m in handed) == sorted(nodes)
    assert queue.empty()


@pytest.mark.parametrize("dispatching", [True, False], ids=["engine-running", "no-engine"])
def test_a_pushed_batch_is_queued_by_the_pushing_thread(monkeypatch: pytest.MonkeyPatch, dispatching: bool) -> None:
    monkeypatch.setattr(dispatch, "POLL_S", FALLBACK_S)
    with wake.event_driven_link():
        state, nodes = _bench().build_state(5, 0)
        signal = wake.instructions_signal(state)
        queue: Queue[Message] = Queue()
        putters: list[threading.Thread] = []
        put = queue.put

        def recording_put(msg: Message) -> None:
            putters.append(threading.current_thread())
            put(msg)

        queue.put = recording_put  # type: ignore[method-assign]
        stop, asleep = threading.Event(), threading.Event()
        wait_past = signal.wait_past

        def noted_wait(generation: int, timeout: float) -> bool:
            asleep.set()
            return wait_past(generation, timeout)

        signal.wait_past = noted_wait  # type: ignore[method-assign]
        sleeper = threading.Thread(target=dispatch._add_messages_to_queue, args=(state, queue, nodes, stop))
        if dispatching:
            sleeper.start()
            assert asleep.wait(FALLBACK_S / 2), "the dispatcher never went to sleep"  # its first sweep is done
        seen = signal.generation
        stores: list[int] = []
        store = InMemoryLinkState.store_message_ins  # the signalling wrapper

        def counting_store(self: InMemoryLinkState, message: Message) -> object:
            stores.append(signal.generation)  # no wake-up per store: the counter stays put during the batch
            return store(self, message)

        try:
            with monkeypatch.context() as patch:
                patch.setattr(InMemoryLinkState, "store_message_ins", counting_store)
                pushed = set(_grid(state).push_messages(_messages(nodes)))
            queued_at_return = list(putters)
        finally:
            stop.set()
            signal.notify()
            if dispatching:
                sleeper.join(FALLBACK_S)
        handed = [queue.get_nowait() for _ in range(queue.qsize())]
    assert stores == [seen] * len(nodes) and signal.generation > seen  # one signal, after the last store
    if dispatching:
        assert queued_at_return == [threading.current_thread()] * len(nodes)  # queued by the push itself
        assert {m.metadata.message_id for m in handed} == pushed and len(handed) == len(nodes)  # each once
        assert signal._hand_over is None and not sleeper.is_alive()  # unregistered when the dispatcher ends
    else:  # no engine running: nothing hands them out; the state keeps them for whoever dispatches later
        assert handed == [] and len(dispatch.take_undelivered(state, nodes)) == len(nodes)


@pytest.mark.parametrize("streaming", [True, False], ids=["fedshield-StreamingGrid", "flower-send_and_receive"])
def test_grid_receives_each_reply_without_a_timeout(streaming: bool) -> None:
    with wake.event_driven_link():
        state, nodes = _bench().build_state(3, 0)
        grid = _grid(state)
        woke: list[bool] = []
        asleep = threading.Semaphore(0)
        wait = grid.wait_for_replies

        def recording_wait(timeout: float) -> bool:
            asleep.release()
            woke.append(wait(timeout))
            return woke[-1]

        grid.wait_for_replies = recording_wait  # type: ignore[method-assign]
        instructions: list[Message] = []

        def answer() -> None:  # what the engine's worker and injector do, one reply each time the grid sleeps
            for i in range(len(nodes)):
                asleep.acquire(timeout=FALLBACK_S)
                if i == 0:  # the grid pushed, pulled nothing and went to sleep
                    instructions.extend(dispatch.take_undelivered(state, nodes))
                reply = Message(RecordDict(), reply_to=instructions[i])
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                state.store_message_res(reply)

        answerer = threading.Thread(target=answer)
        answerer.start()
        if streaming:
            got = list(StreamingGrid(grid, pull_interval=FALLBACK_S).send_and_receive(_messages(nodes), timeout=600))
        else:
            got = list(grid.send_and_receive(_messages(nodes), timeout=600))
        answerer.join(FALLBACK_S)
    assert {r.metadata.reply_to_message_id for r in got} == {m.metadata.message_id for m in instructions}
    assert len(got) == len(nodes) == len(instructions)
    assert woke == [True] * len(nodes)  # each wait ended on a stored reply, none on the fallback interval


def test_patched_only_inside_the_block() -> None:
    run_sim = importlib.import_module("flwr.simulation.run_simulation")
    originals = (InMemoryLinkState.store_message_ins, InMemoryLinkState.store_message_res, run_sim.InMemoryGrid)
    with wake.event_driven_link():
        assert run_sim.InMemoryGrid is wake.SignalledInMemoryGrid
        assert InMemoryLinkState.store_message_ins is not originals[0]
    assert (InMemoryLinkState.store_message_ins, InMemoryLinkState.store_message_res, run_sim.InMemoryGrid) == originals
    assert run_sim.InMemoryGrid is InMemoryGrid


def test_a_push_that_fails_part_way_still_hands_out_what_it_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "POLL_S", FALLBACK_S)
    with wake.event_driven_link():
        state, nodes = _bench().build_state(2, 0)
        good, bad = _messages(nodes)
        bad.metadata.__dict__["_ttl"] = 0.0  # Flower's grid refuses it after storing the first one
        with _dispatcher(state, nodes) as queue:
            with pytest.raises(ValueError, match="Invalid message"):
                _grid(state).push_messages([good, bad])
            handed = queue.get(timeout=FALLBACK_S / 2)  # without the fallback tick: at once
    assert handed.metadata.message_id == good.metadata.message_id and queue.empty()
