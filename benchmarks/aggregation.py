"""Server memory and time of FedAvg aggregation: Flower's ``aggregate_arrayrecords`` vs fedshield's streaming fold.

Three ways to aggregate the same N float32 replies of P parameters (4 arrays), weighted by example count:

* ``flower``: the N replies as a list (what ``grid.send_and_receive`` returns), then Flower 1.39's
  ``aggregate_arrayrecords``;
* ``fold/list``: the same list through :class:`fedshield.strategies.streaming.WeightedSum` (what
  ``StreamingFedAvg`` does inside ``Strategy.start`` with a stock grid);
* ``fold/stream``: replies folded as they "arrive" and dropped at once (what ``StreamingFedAvg`` does behind
  :class:`~fedshield.strategies.streaming.StreamingGrid`).

Peak = tracemalloc's peak of traced memory (Python objects and NumPy buffers) from the first reply to the result,
so it includes the replies the server holds. Time = aggregation only (building the replies is not counted).
Replies are ArrayRecords as they come off the wire (each Array holds its serialized bytes).

Usage::

    python benchmarks/aggregation.py                 # 10/100/1000 clients x 100k/10M parameters
    python benchmarks/aggregation.py --max-gb 8      # list modes skip cases whose replies exceed 8 GB
"""

from __future__ import annotations

import argparse
import gc
import time
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


MODES: dict[str, Callable[[int, dict[str, tuple[int, ...]]], tuple[float, float, Any]]] = {
    "flower": run_flower, "fold/list": run_fold_list, "fold/stream": run_fold_stream,
}


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
    args = parser.parse_args()
    # Import everything before measuring, so module objects do not count as aggregation memory.
    import flwr.serverapp.strategy.strategy_utils  # noqa: F401
    import fedshield.strategies.streaming  # noqa: F401

    make_reply(0, shapes_for(100_000))
    print(f"{'clients':>7} {'params':>10} {'replies MB':>10} | {'mode':<11} {'peak MB':>9} {'agg s':>8} | check")
    for params in args.params:
        for n in args.clients:
            replies_gb = n * params * 4 / 2**30
            modes = list(MODES)
            if replies_gb > args.max_gb:
                print(f"{n:>7} {params:>10} {replies_gb * 1024:>10.0f} | flower, fold/list: skipped, the {n} "
                      f"replies alone would hold {replies_gb:.1f} GB > --max-gb {args.max_gb:g}")
                modes = ["fold/stream"]  # holds one reply at a time, so it still fits
            reference = None
            for mode in modes:
                peak, seconds, probe = measure(mode, n, params)
                if reference is None:
                    reference = probe
                same = "ok" if np.allclose(probe, reference, rtol=1e-5, atol=1e-9) else "MISMATCH"
                print(f"{n:>7} {params:>10} {replies_gb * 1024:>10.0f} | {mode:<11} {peak:>9.1f} {seconds:>8.3f} | {same}",
                      flush=True)


if __name__ == "__main__":
    main()
