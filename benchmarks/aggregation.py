"""Server memory and time of FedAvg aggregation: Flower's ``aggregate_arrayrecords`` vs fedshield's streaming fold.

Five ways to aggregate the same N float32 replies of P parameters (4 arrays), weighted by example count:

* ``flower``: the N replies as a list (what ``grid.send_and_receive`` returns), then Flower 1.39's
  ``aggregate_arrayrecords``;
* ``fold/list``: the same list through :class:`fedshield.strategies.streaming.WeightedSum` (what
  ``StreamingFedAvg`` does inside ``Strategy.start`` with a stock grid);
* ``fold/stream``: replies folded as they "arrive" and dropped at once (what ``StreamingFedAvg`` does behind
  :class:`~fedshield.strategies.streaming.StreamingGrid`);
* ``stack/list``: the server's whole wrapper chain for ``fedavg`` as :func:`fedshield.strategies.stack.build_strategy`
  builds it (recording, update validation, ``StreamingFedAvg``), fed the list a stock grid returns;
* ``stack/stream``: the same chain behind the ``StreamingGrid`` that :func:`~fedshield.server.runner.run_server`
  puts in front of every grid, over a stand-in grid whose replies "arrive" one per pull: the server's real path.

The stack rows include what the wrappers add: validation decodes every array to check it is finite (so the time is
about 3x the bare fold's), and the chain keeps the global model and a few hundred bytes per client (verdicts, sizes,
metrics), so their peak grows by about 2 KB per client instead of a model per client. Their time leaves out building
the replies, like the others'.

Peak = tracemalloc's peak of traced memory (Python objects and NumPy buffers) from the first reply to the result,
so it includes the replies the server holds. Time = aggregation only (building the replies is not counted).
Replies are ArrayRecords as they come off the wire (each Array holds its serialized bytes).

Usage::

    python benchmarks/aggregation.py                 # 10/100/1000 clients x 100k/10M parameters
    python benchmarks/aggregation.py --max-gb 8      # list modes skip cases whose replies exceed 8 GB
    python benchmarks/aggregation.py --clients 10 100 --params 100000 --repeats 3 --json OUT

``--repeats R`` measures every case R times (modes interleaved) and reports medians; ``--json OUT`` writes rows
``{name, ours, baseline, unit, ratio, detail}``: the server's real path (``stack/stream``) and the bare streaming
fold (``fold/stream``) against Flower's ``aggregate_arrayrecords``, peak memory and time.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from pathlib import Path
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

WEIGHT_KEY = "num-examples"


def shapes_for(params: int) -> dict[str, tuple[int, ...]]:
    """Four arrays (two weight matrices, two biases) totalling ``params`` entries."""
    bias = max(1, params // 1000)
    rows = max(1, (params - 2 * bias) // 2 // 1000)
    w1 = rows * 1000
    w2 = params - 2 * bias - w1
    return {"l1.weight": (rows, 1000), "l1.bias": (bias,), "l2.weight": (w2,), "l2.bias": (bias,)}


def make_reply(i: int, shapes: dict[str, tuple[int, ...]]) -> Any:
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

    arrays = {k: Array(np.full(s, 0.001 * (i % 97), dtype=np.float32)) for k, s in shapes.items()}
    return RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({WEIGHT_KEY: float(10 + i % 50)})})


def run_flower(n: int, shapes: dict[str, tuple[int, ...]]) -> tuple[float, float, Any]:
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    replies = [make_reply(i, shapes) for i in range(n)]
    start = time.perf_counter()
    result = aggregate_arrayrecords(replies, WEIGHT_KEY)
    return time.perf_counter() - start, 0.0, result


def _fold(records: Iterator[Any]) -> tuple[float, Any]:
    from fedshield.strategies.streaming import WeightedSum

    fold, spent = WeightedSum(), 0.0
    for record in records:
        start = time.perf_counter()
        fold.add(record["arrays"], float(record["metrics"][WEIGHT_KEY]))
        spent += time.perf_counter() - start
    start = time.perf_counter()
    result = fold.average()
    return spent + time.perf_counter() - start, result


def run_fold_list(n: int, shapes: dict[str, tuple[int, ...]]) -> tuple[float, float, Any]:
    replies = [make_reply(i, shapes) for i in range(n)]
    spent, result = _fold(iter(replies))
    return spent, 0.0, result


def run_fold_stream(n: int, shapes: dict[str, tuple[int, ...]]) -> tuple[float, float, Any]:
    def arriving() -> Iterator[Any]:
        for i in range(n):
            yield make_reply(i, shapes)  # the generator keeps no reference once the fold moves on

    spent, result = _fold(arriving())
    return spent, 0.0, result


class _ArrivingGrid:
    """Enough of a Grid for the server's chain: every pull brings the next reply, built then (it "arrives")."""

    def __init__(self, n: int, shapes: dict[str, tuple[int, ...]]) -> None:
        self.ids = list(range(1, n + 1))
        self.shapes = shapes
        self.pending: list[Any] = []
        self.build_s = 0.0  # time spent making replies, left out of the aggregation time

    def get_node_ids(self) -> list[int]:
        return list(self.ids)

    def push_messages(self, messages: Any) -> list[str]:
        self.pending = list(messages)
        for i, msg in enumerate(self.pending):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
        return [m.metadata.message_id for m in self.pending]

    def pull_messages(self, message_ids: Any) -> list[Any]:
        if not self.pending:
            return []
        start = time.perf_counter()
        out = [self.reply(self.pending.pop(0))]
        self.build_s += time.perf_counter() - start
        return out

    def reply(self, msg: Any) -> Any:
        from flwr.app import Message

        return Message(make_reply(self.ids.index(msg.metadata.dst_node_id), self.shapes), reply_to=msg)


def _server_chain(n: int, shapes: dict[str, tuple[int, ...]]) -> tuple[Any, _ArrivingGrid, list[Any]]:
    """The chain build_strategy makes for a plain fedavg run, configured for one round of n clients."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from fedshield.config import RunConfig
    from fedshield.strategies.stack import build_strategy

    strategy = build_strategy(RunConfig(num_clients=n, secagg=False, dp=False)).top
    grid = _ArrivingGrid(n, shapes)
    global_arrays = ArrayRecord({k: Array(np.zeros(s, dtype=np.float32)) for k, s in shapes.items()})
    messages = list(strategy.configure_train(1, global_arrays, ConfigRecord(), grid))
    return strategy, grid, messages


def run_stack_list(n: int, shapes: dict[str, tuple[int, ...]]) -> tuple[float, float, Any]:
    strategy, grid, messages = _server_chain(n, shapes)
    grid.push_messages(messages)
    replies = [grid.reply(m) for m in messages]
    del messages
    start = time.perf_counter()
    arrays, _ = strategy.aggregate_train(1, replies)
    return time.perf_counter() - start, 0.0, arrays


def run_stack_stream(n: int, shapes: dict[str, tuple[int, ...]]) -> tuple[float, float, Any]:
    from fedshield.strategies.streaming import StreamingGrid

    strategy, grid, messages = _server_chain(n, shapes)
    start = time.perf_counter()
    replies = StreamingGrid(grid, pull_interval=0.0).send_and_receive(messages)  # type: ignore[arg-type]
    del messages
    arrays, _ = strategy.aggregate_train(1, replies)
    return time.perf_counter() - start - grid.build_s, 0.0, arrays


MODES: dict[str, Callable[[int, dict[str, tuple[int, ...]]], tuple[float, float, Any]]] = {
    "flower": run_flower, "fold/list": run_fold_list, "fold/stream": run_fold_stream,
    "stack/list": run_stack_list, "stack/stream": run_stack_stream,
}
#: Modes that hold every reply at once (skipped above --max-gb).
LIST_MODES = ("flower", "fold/list", "stack/list")


def measure(mode: str, n: int, params: int) -> tuple[float, float, np.ndarray[Any, Any]]:
    shapes = shapes_for(params)
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        seconds, _, result = MODES[mode](n, shapes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    probe = result["l2.weight"].numpy()[:4].copy()
    del result
    gc.collect()
    return peak / 2**20, seconds, probe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--params", type=int, nargs="+", default=[100_000, 10_000_000])
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip cases whose N replies exceed this")
    parser.add_argument("--repeats", type=int, default=1, help="measurements per case; the table shows medians")
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    args = parser.parse_args()
    # Import everything before measuring, so module objects do not count as aggregation memory.
    import flwr.serverapp.strategy.strategy_utils  # noqa: F401
    from flwr.supercore.task_identity import TaskIdentity

    import fedshield.server.runner  # noqa: F401
    import fedshield.strategies.streaming  # noqa: F401

    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every sampling and aggregation at INFO
    # The identity a ServerApp process has: Flower needs it to build the strategy's train messages.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    make_reply(0, shapes_for(100_000))
    run_stack_stream(2, shapes_for(100_000))  # first calls (logging, lazy imports) outside the measurements
    print(f"{'clients':>7} {'params':>10} {'replies MB':>10} | {'mode':<11} {'peak MB':>9} {'agg s':>8} | check"
          + (f"   (medians of {args.repeats})" if args.repeats > 1 else ""))
    rows: list[dict[str, Any]] = []
    for params in args.params:
        for n in args.clients:
            replies_gb = n * params * 4 / 2**30
            modes = list(MODES)
            if replies_gb > args.max_gb:
                print(f"{n:>7} {params:>10} {replies_gb * 1024:>10.0f} | {', '.join(LIST_MODES)}: skipped, the {n} "
                      f"replies alone would hold {replies_gb:.1f} GB > --max-gb {args.max_gb:g}")
                modes = [m for m in MODES if m not in LIST_MODES]  # one reply at a time, so they still fit
            reference = None
            runs: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
            for _ in range(args.repeats):
                for mode in modes:
                    peak, seconds, probe = measure(mode, n, params)
                    if reference is None:
                        reference = probe
                    if not np.allclose(probe, reference, rtol=1e-5, atol=1e-9):
                        raise RuntimeError(f"{mode} disagrees with {modes[0]} for {n} clients x {params} parameters")
                    runs[mode].append((peak, seconds))
            for mode in modes:
                peak = statistics.median(p for p, _ in runs[mode])
                seconds = statistics.median(t for _, t in runs[mode])
                print(f"{n:>7} {params:>10} {replies_gb * 1024:>10.0f} | {mode:<11} {peak:>9.1f} {seconds:>8.3f} | ok",
                      flush=True)
            rows += json_rows(n, params, runs, args.max_gb)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")


def json_rows(n: int, params: int, runs: dict[str, list[tuple[float, float]]], max_gb: float) -> list[dict[str, Any]]:
    """``stack/stream`` (the server's path) and ``fold/stream`` vs Flower's ``aggregate_arrayrecords``; when the
    replies exceed ``--max-gb`` Flower's mode is skipped and the baseline is null."""
    rows = []
    for ours in ("stack/stream", "fold/stream"):
        for index, what, unit in ((0, "peak memory", "MB"), (1, "time", "s")):
            a = statistics.median(r[index] for r in runs[ours])
            base_runs = [r[index] for r in runs.get("flower", [])]
            b = statistics.median(base_runs) if base_runs else None
            detail = {"better": "lower", "repeats": len(runs[ours]), "ours_is": ours, "baseline_is": "flower",
                      "ours_runs": [r[index] for r in runs[ours]], "baseline_runs": base_runs}
            if b is None:
                detail["note"] = f"Flower's list mode skipped: the {n} replies exceed --max-gb {max_gb:g}"
            rows.append({"name": f"{ours} {what}, {n} clients x {params:,} params", "ours": a, "baseline": b,
                         "unit": unit, "ratio": a / b if b else None, "detail": detail})
    return rows


if __name__ == "__main__":
    main()
