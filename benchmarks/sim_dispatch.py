"""One dispatch sweep of Flower's simulation engine: Flower 1.39's per-node ``get_message_ins`` loop vs fedshield's
one walk (:mod:`fedshield.simulation.dispatch`), on the same real ``InMemoryLinkState``.

The state is built the way ``flwr.simulation.run_simulation`` builds it (its ``_register_nodes``, a run registered
with its primary task, an ``InMemoryGrid`` pushing one message per node: a round where every client is asked, as
Flower's ``fraction_evaluate=1.0`` default does). Each size times two sweeps: the first, which delivers every
message, and the next, when all are delivered but still in the store until their replies are pulled (what every
0.1 s tick of a round costs until then). Usage::

    python benchmarks/sim_dispatch.py [--nodes 100 1000 5000] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

REPEATS = 3


def build_state(num_nodes: int, num_messages: int, *, ttl: float | None = None) -> tuple[Any, dict[int, int]]:
    """A real in-memory LinkState with ``num_nodes`` registered nodes and ``num_messages`` pushed (round-robin)."""
    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.server.superlink.fleet.vce import vce_api
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import RunRecord
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(), ObjectStoreFactory())
    nodes = vce_api._register_nodes(num_nodes, factory)
    state = factory.state()
    run = Run.create_empty(run_id=4242)
    run.primary_task_id, run.federation_id = 7, NOOP_FEDERATION_ID
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[7] = Task(task_id=7, run_id=run.run_id)
    # What run_simulation sets for its (legacy) ServerApp thread: messages are created with this identity.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    grid = InMemoryGrid(state_factory=factory)
    grid.set_run(run)
    ids = list(nodes)
    messages = [Message(RecordDict({"c": ConfigRecord({"i": i})}), ids[i % num_nodes], "train", ttl=ttl)
                for i in range(num_messages)]
    pushed = list(grid.push_messages(messages))
    if len(pushed) != num_messages:
        raise RuntimeError(f"pushed {len(pushed)} of {num_messages} messages")
    return state, nodes


def flower_sweep(state: Any, nodes: dict[int, int]) -> list[Any]:
    """What one tick of Flower 1.39's ``add_messages_to_queue`` takes from the state."""
    return [msg for node_id in nodes for msg in state.get_message_ins(node_id=node_id, limit=1)]


def fedshield_sweep(state: Any, nodes: dict[int, int]) -> list[Any]:
    from fedshield.simulation.dispatch import take_undelivered

    return take_undelivered(state, nodes)


def time_sweeps(sweep: Any, n: int) -> tuple[float, float]:
    state, nodes = build_state(n, n)
    start = time.perf_counter()
    first = sweep(state, nodes)
    mid = time.perf_counter()
    again = sweep(state, nodes)
    end = time.perf_counter()
    if len(first) != n or again:
        raise RuntimeError(f"{sweep.__name__}: delivered {len(first)} then {len(again)} of {n}")
    return mid - start, end - mid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    args = parser.parse_args()
    import logging

    logging.getLogger("flwr").setLevel(logging.ERROR)
    print(f"one message per node; median of {args.repeats} repeat(s); seconds per sweep")
    print(f"{'nodes':>7} {'Flower 1st':>11} {'Flower next':>12} {'ours 1st':>9} {'ours next':>10} {'ratio next':>11}")
    rows = []
    for n in args.nodes:
        flower = [time_sweeps(flower_sweep, n) for _ in range(args.repeats)]
        ours = [time_sweeps(fedshield_sweep, n) for _ in range(args.repeats)]
        f1, f2 = (statistics.median(t[i] for t in flower) for i in (0, 1))
        o1, o2 = (statistics.median(t[i] for t in ours) for i in (0, 1))
        print(f"{n:>7} {f1:>11.4f} {f2:>12.4f} {o1:>9.4f} {o2:>10.4f} {o2 / f2:>11.5f}", flush=True)
        for label, ours_s, flower_s in (("delivering sweep", o1, f1), ("sweep with all delivered", o2, f2)):
            rows.append({"name": f"dispatch {label}, {n} nodes x {n} messages", "ours": ours_s, "baseline": flower_s,
                         "unit": "s", "ratio": ours_s / flower_s, "detail": {
                             "better": "lower", "repeats": args.repeats, "ours_is": "fedshield one walk",
                             "baseline_is": "Flower 1.39 get_message_ins per node",
                             "note": f"median of {args.repeats}; the engine sweeps every 0.1 s, holding the state's lock"}})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
