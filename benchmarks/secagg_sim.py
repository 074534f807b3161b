"""Per-round wall time of plain FedAvg vs SecAgg+(FedAvg) on Flower's simulation engine.

Clients do no training: each returns the global model plus a fixed pseudo-random update, so the figures are the
cost of the aggregation protocol (messages, masking, key agreement, unmasking) and Flower's own overhead. Round
time is the time between consecutive calls of ``evaluate_fn``, which ``Strategy.start`` makes after each round;
round 1 (Ray start, imports) is excluded from the median.

Usage::

    python benchmarks/secagg_sim.py --clients 5 10 --rounds 6
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

#: A two-layer MLP on 28x28 inputs: 101,770 parameters.
SHAPES = {"fc1.weight": (128, 784), "fc1.bias": (128,), "fc2.weight": (10, 128), "fc2.bias": (10,)}


def initial_arrays() -> Any:
    from flwr.app import Array, ArrayRecord

    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(0, 0.05, size=s).astype(np.float32)) for k, s in SHAPES.items()})


def client_app(secagg: bool) -> Any:
    """A ClientApp that adds a small seeded update to the global model; with SecAgg+ mods if asked."""
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.clientapp.typing import Mod

    from fedshield.client.secagg_mod import secagg_adapter_mod
    from fedshield.protocol import ARRAYS, METRICS, NUM_EXAMPLES

    app = ClientApp()
    mods: list[Mod] = [secaggplus_mod, secagg_adapter_mod] if secagg else []

    @app.train(mods=mods)
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        rnd = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        rng = np.random.default_rng([pid, rnd])
        glob = msg.content.array_records[ARRAYS]
        local = {k: Array((a.numpy() + rng.normal(0, 0.01, size=a.shape)).astype(np.float32)) for k, a in glob.items()}
        metrics = MetricRecord({NUM_EXAMPLES: 100})
        return Message(RecordDict({ARRAYS: ArrayRecord(local), METRICS: metrics}), reply_to=msg)

    return app


def server_app(secagg: bool, num_clients: int, num_rounds: int, stamps: list[float]) -> Any:
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg, Strategy

    from fedshield.strategies.secagg import SecAggPlus

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        # min_train_nodes: the ServerApp starts before the simulation has registered every node.
        strategy: Strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=num_clients, min_available_nodes=num_clients)
        if secagg:
            strategy = SecAggPlus(strategy, timeout=300)

        def stamp(_rnd: int, _arrays: ArrayRecord) -> None:
            stamps.append(time.perf_counter())

        strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=num_rounds, evaluate_fn=stamp)

    return app


def round_times(secagg: bool, num_clients: int, num_rounds: int) -> list[float]:
    """Run one simulation; return the wall time of each round."""
    from flwr.simulation import run_simulation

    stamps: list[float] = []
    ray_tmp = tempfile.mkdtemp(prefix="fsray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        run_simulation(
            server_app=server_app(secagg, num_clients, num_rounds, stamps),
            client_app=client_app(secagg),
            num_supernodes=num_clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"_temp_dir": ray_tmp, "include_dashboard": False},
            },
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if len(stamps) != num_rounds + 1:
        raise RuntimeError(f"expected {num_rounds + 1} time stamps, got {len(stamps)}: the run failed")
    return [b - a for a, b in itertools.pairwise(stamps)]


def table(rows: list[tuple[int, list[float], list[float]]]) -> str:
    median: Callable[[list[float]], float] = statistics.median
    lines = [
        "clients | FedAvg s/round | SecAgg+ s/round | ratio | round 1 FedAvg / SecAgg+ (s)",
        "------- | -------------- | --------------- | ----- | ----------------------------",
    ]
    for n, plain, sec in rows:
        p, s = median(plain[1:]), median(sec[1:])
        lines.append(f"{n:>7} | {p:>14.3f} | {s:>15.3f} | {s / p:>5.2f} | {plain[0]:.1f} / {sec[0]:.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run; round 1 is excluded (>= 2)")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported: it reads it once
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    print(f"model: {params:,} parameters (float32); rounds per run: {args.rounds}; median over rounds 2..{args.rounds}")
    rows = []
    for n in args.clients:
        plain = round_times(False, n, args.rounds)
        sec = round_times(True, n, args.rounds)
        print(f"{n} clients: FedAvg {[round(t, 3) for t in plain]}, SecAgg+ {[round(t, 3) for t in sec]}", flush=True)
        rows.append((n, plain, sec))
    print(table(rows))


if __name__ == "__main__":
    main()
