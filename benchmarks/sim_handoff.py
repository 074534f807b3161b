"""The simulation's hand-off latency alone: push a round's messages, get every reply back, with clients that answer
at once, so only the waiting between the ServerApp, the engine's dispatcher and the replies is timed.

Real parts: Flower 1.39's ``InMemoryLinkState`` (nodes registered as the engine does), fedshield's dispatcher loop
(:func:`fedshield.simulation.dispatch._add_messages_to_queue`, in its own thread, as the engine runs it), Flower's
``store_message_res`` for the replies (one thread taking each instruction and storing its reply, as the engine's
worker and injector threads do, minus the Ray call), and the ServerApp's ``StreamingGrid`` pulling with fedshield's
``PULL_INTERVAL_S``. "ticks" is that code with fixed waits (0.1 s dispatch sweep, 0.2 s pull interval: the code
before issue 13); "event" runs it inside :func:`fedshield.simulation.wake.event_driven_link`. Same run, alternating.

Usage::

    python benchmarks/sim_handoff.py [--clients 10] [--rounds 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from queue import Empty, Queue
from typing import Any
from uuid import uuid4

HERE = Path(__file__).resolve().parent


def _bench_state(clients: int) -> tuple[Any, dict[int, int]]:
    spec = importlib.util.spec_from_file_location("sim_dispatch", HERE / "sim_dispatch.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_state(clients, 0)


def _answer(state: Any, queue: Queue[Any], stop: threading.Event) -> None:
    from flwr.app import Message, RecordDict

    while not stop.is_set():
        try:
            msg = queue.get(timeout=0.05)
        except Empty:
            continue
        reply = Message(RecordDict(), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        state.store_message_res(reply)


def exchanges(mode: str, clients: int, rounds: int) -> list[float]:
    """Seconds from push to the last reply pulled, for each of ``rounds`` exchanges of ``clients`` messages."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.superlink.grid import InMemoryGrid

    from fedshield.server.runner import PULL_INTERVAL_S
    from fedshield.simulation import dispatch, wake
    from fedshield.strategies.streaming import StreamingGrid

    with wake.event_driven_link() if mode == "event" else nullcontext():
        state, nodes = _bench_state(clients)
        grid_cls = wake.SignalledInMemoryGrid if mode == "event" else InMemoryGrid
        inner = grid_cls(state_factory=type("F", (), {"state": lambda self: state})())
        inner.set_run(state.run_ids[4242].run)
        grid = StreamingGrid(inner, pull_interval=PULL_INTERVAL_S)
        queue: Queue[Any] = Queue()
        stop = threading.Event()
        threads = [threading.Thread(target=dispatch._add_messages_to_queue, args=(state, queue, nodes, stop)),
                   threading.Thread(target=_answer, args=(state, queue, stop))]
        for t in threads:
            t.start()
        times: list[float] = []
        try:
            for r in range(rounds):
                messages = [Message(RecordDict({"c": ConfigRecord({"r": r})}), nid, "train") for nid in nodes]
                start = time.perf_counter()
                got = list(grid.send_and_receive(messages, timeout=60))
                times.append(time.perf_counter() - start)
                if len(got) != clients:
                    raise RuntimeError(f"{mode}: {len(got)} of {clients} replies")
        finally:
            stop.set()
            for t in threads:
                t.join()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    args = parser.parse_args()
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    from flwr.supercore.task_identity import TaskIdentity  # build_state sets it, as run_simulation does

    del TaskIdentity
    runs: dict[str, list[float]] = {"ticks": [], "event": []}
    for i in range(2):
        for mode in (("ticks", "event") if i == 0 else ("event", "ticks")):
            runs[mode] += exchanges(mode, args.clients, args.rounds)
    ticks, event = statistics.median(runs["ticks"]), statistics.median(runs["event"])
    print(f"{args.clients} messages per exchange, {2 * args.rounds} exchanges per mode; seconds push -> all replies")
    print(f"ticks (0.1 s sweep, 0.2 s pull): median {ticks:.4f}  event-driven: median {event:.4f}  "
          f"ratio {event / ticks:.4f}")
    if args.json:
        row = {"name": f"simulation hand-off, push to all replies, {args.clients} instant clients", "ours": event,
               "baseline": ticks, "unit": "s", "ratio": event / ticks,
               "detail": {"better": "lower", "repeats": 2 * args.rounds, "ours_is": "event-driven hand-offs",
                          "baseline_is": "0.1 s dispatch tick + 0.2 s reply pull"}}
        Path(args.json).write_text(json.dumps([row], indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
