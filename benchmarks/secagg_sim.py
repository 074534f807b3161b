"""Per-round wall time of plain FedAvg vs SecAgg+(FedAvg) on Flower's simulation engine, two ways (``--app``):

* ``protocol``: clients do no training: each returns the global model plus a fixed pseudo-random update, so the
  figures are the cost of the aggregation protocol alone (messages, masking, key agreement, unmasking) and
  Flower's own overhead: the worst case for the ratio, since a real round adds training to both sides. Round time
  is the time between consecutive calls of ``evaluate_fn``, which ``Strategy.start`` makes after each round.
* ``fedshield``: the round a user gets: ``fedshield simulate``'s default job (digits CNN, DP-SGD at epsilon 8,
  every client trained and evaluated each round) with ``secagg`` on and off, round time from ``metrics.jsonl``'s
  ``round_time_s`` (training, SecAgg+'s stages, aggregation, federated and server evaluation).

Round 1 (Ray start, imports) is excluded from the median. Usage::

    python benchmarks/secagg_sim.py --clients 5 10 --rounds 6 [--repeats 1] [--app protocol fedshield] [--shares 7]
                                    [--json OUT] [--unsigned]

``--repeats R`` runs both R times per client count (alternating which goes first) and takes the median over all
their rounds 2..R; ``--json OUT`` writes rows ``{name, ours, baseline, unit, ratio, detail}``: SecAgg+'s median
round time against plain FedAvg's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: A two-layer MLP on 28x28 inputs: 101,770 parameters.
SHAPES = {"fc1.weight": (128, 784), "fc1.bias": (128,), "fc2.weight": (10, 128), "fc2.bias": (10,)}


def initial_arrays() -> Any:
    from flwr.app import Array, ArrayRecord

    rng = np.random.default_rng(0)
    return ArrayRecord({k: Array(rng.normal(0, 0.05, size=s).astype(np.float32)) for k, s in SHAPES.items()})


def sign_in_mod(keys_dir: Path) -> Any:
    """A mod giving virtual client ``partition-id`` its own node key and the roster, as ``fedshield client --node-key
    --roster`` does on a site: its SecAgg+ keys are then signed, and it verifies every peer's."""
    from fedshield.client.node_config import NODE_KEY, SECAGG_ROSTER

    def mod(msg: Any, ctx: Any, call_next: Any) -> Any:
        pid = int(ctx.node_config["partition-id"])
        ctx.node_config.update({SECAGG_ROSTER: str(keys_dir / "roster.txt"), NODE_KEY: str(keys_dir / f"site-{pid}.key")})
        return call_next(msg, ctx)

    return mod


def make_roster(keys_dir: Path, num_clients: int) -> None:
    """One node key per virtual client (as ``fedshield keys site-key`` makes) and the roster of all of them."""
    from fedshield.crypto import make_site_key

    pubs = [make_site_key(keys_dir, name=f"site-{i}")[0] for i in range(num_clients)]
    (keys_dir / "roster.txt").write_text("".join(p.read_text() for p in pubs))


def client_app(secagg: bool, keys_dir: Path | None = None) -> Any:
    """A ClientApp that adds a small seeded update to the global model; with SecAgg+ mods if asked (fedshield's
    ``secaggplus_mod``: ChaCha20 masks; signed and verified round keys when ``keys_dir`` holds a roster)."""
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.clientapp.typing import Mod

    from fedshield.client.secagg_mod import secagg_adapter_mod
    from fedshield.client.secaggplus import secaggplus_mod
    from fedshield.protocol import ARRAYS, METRICS, NUM_EXAMPLES

    app = ClientApp()
    mods: list[Mod] = [secaggplus_mod, secagg_adapter_mod] if secagg else []
    if secagg and keys_dir is not None:
        mods.insert(0, sign_in_mod(keys_dir))

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


def server_app(secagg: bool, num_clients: int, num_rounds: int, stamps: list[float], shares: float = 1.0) -> Any:
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
            strategy = SecAggPlus(strategy, timeout=300, num_shares=int(shares) if shares > 1 else shares)

        def stamp(_rnd: int, _arrays: ArrayRecord) -> None:
            stamps.append(time.perf_counter())

        strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=num_rounds, evaluate_fn=stamp)

    return app


def protocol_round_times(secagg: bool, num_clients: int, num_rounds: int, shares: float = 1.0) -> list[float]:
    """Run one simulation; return the wall time of each round."""
    from flwr.simulation import run_simulation

    stamps: list[float] = []
    # Short: Ray's socket paths must fit 107 bytes. $TMPDIR if set (tests point it at a directory they check).
    ray_tmp = tempfile.mkdtemp(prefix="fsray", dir=os.environ.get("TMPDIR") or "/tmp")
    keys_dir = None
    if secagg and SIGNED:
        keys_dir = Path(ray_tmp) / "keys"
        make_roster(keys_dir, num_clients)
    try:
        run_simulation(
            server_app=server_app(secagg, num_clients, num_rounds, stamps, shares),
            client_app=client_app(secagg, keys_dir),
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


def fedshield_round_times(secagg: bool, num_clients: int, num_rounds: int, shares: float = 1.0) -> list[float]:
    """Run fedshield's default simulation (digits, DP-SGD, every client each round); return each round's time."""
    from fedshield.config import RunConfig
    from fedshield.simulation.run import simulate

    tmp = Path(tempfile.mkdtemp(prefix="fssecagg", dir=os.environ.get("TMPDIR") or "/tmp"))
    try:
        config = RunConfig(num_clients=num_clients, num_rounds=num_rounds, secagg=secagg, secagg_shares=shares,
                           out=tmp / "run")
        simulate(config, ray_temp_dir=str(tmp / "ray"))
        rows = [json.loads(x) for x in (config.out / "metrics.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if len(rows) != num_rounds or any(r["clients_trained"] != num_clients for r in rows):
        raise RuntimeError(f"expected {num_rounds} rounds of {num_clients} trained clients, got "
                           f"{[r['clients_trained'] for r in rows]}")
    return [float(r["round_time_s"]) for r in rows]


RUNNERS: dict[str, Callable[[bool, int, int, float], list[float]]] = {"protocol": protocol_round_times, "fedshield": fedshield_round_times}
NOTES = {"protocol": "clients do no training (protocol cost alone)",
         "fedshield": "fedshield's default job: digits CNN, DP-SGD, every client trains and evaluates"}

Rows = list[tuple[str, int, list[list[float]], list[list[float]]]]

#: ``--app protocol``: clients sign their round keys and verify their peers' (``--unsigned``: CSPRNG masks only).
SIGNED = True


def table(rows: Rows) -> str:
    median: Callable[[list[float]], float] = statistics.median
    lines = [
        "app       | clients | FedAvg s/round | SecAgg+ s/round | ratio | round 1 FedAvg / SecAgg+ (s)",
        "--------- | ------- | -------------- | --------------- | ----- | ----------------------------",
    ]
    for app, n, plain, sec in rows:
        p, s = median(_later(plain)), median(_later(sec))
        first_p, first_s = median(r[0] for r in plain), median(r[0] for r in sec)
        lines.append(f"{app:<9} | {n:>7} | {p:>14.3f} | {s:>15.3f} | {s / p:>5.2f} | {first_p:.1f} / {first_s:.1f}")
    return "\n".join(lines)


def _later(runs: list[list[float]]) -> list[float]:
    """Rounds 2..R of every run (round 1 pays for Ray's start and the imports)."""
    return [t for run in runs for t in run[1:]]


def json_rows(rows: Rows, shares: float = 1.0) -> list[dict[str, Any]]:
    out = []
    for app, n, plain, sec in rows:
        p, s = statistics.median(_later(plain)), statistics.median(_later(sec))
        what = "protocol only" if app == "protocol" else "fedshield default job"
        if shares != 1.0:
            what += f", {shares:g} shares"
        out.append({
            "name": f"SecAgg+ vs plain round time, {what}, {n} clients", "ours": s, "baseline": p, "unit": "s/round",
            "ratio": s / p, "detail": {
                "better": "lower", "repeats": len(plain), "rounds_per_run": len(plain[0]),
                "ours_is": "SecAgg+(FedAvg)", "baseline_is": "FedAvg", "ours_runs": sec, "baseline_runs": plain,
                "note": f"median of rounds 2..{len(plain[0])} over {len(plain)} run(s); {NOTES[app]}",
            },
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[5, 10])
    parser.add_argument("--rounds", type=int, default=6, help="rounds per run; round 1 is excluded (>= 2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each per client count")
    parser.add_argument("--app", nargs="+", choices=sorted(RUNNERS), default=["protocol"],
                        help="protocol: clients do no training; fedshield: the default DP job (see the docstring)")
    parser.add_argument("--shares", type=float, default=1.0,
                        help="SecAgg+ neighbours per client: 1.0 = all (default), or a count >= 3 (the sparse graph)")
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    parser.add_argument("--unsigned", action="store_true",
                        help="protocol app: clients do not sign their SecAgg+ keys (default: signed, with a roster)")
    args = parser.parse_args()
    global SIGNED
    SIGNED = not args.unsigned
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: round 1 is excluded")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # before flwr is imported: it reads it once
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    print(f"model: {params:,} parameters (float32); rounds per run: {args.rounds}; median over rounds 2..{args.rounds}; "
          f"SecAgg+ shares {args.shares:g}; protocol-app keys {'unsigned' if args.unsigned else 'signed + roster'}")
    rows: Rows = []
    for app in args.app:
        for n in args.clients:
            plain: list[list[float]] = []
            sec: list[list[float]] = []
            for repeat in range(args.repeats):
                for secagg in (False, True) if repeat % 2 == 0 else (True, False):
                    (sec if secagg else plain).append(RUNNERS[app](secagg, n, args.rounds, args.shares))
                print(f"{app}, {n} clients: FedAvg {[round(t, 3) for t in plain[-1]]}, "
                      f"SecAgg+ {[round(t, 3) for t in sec[-1]]}", flush=True)
            rows.append((app, n, plain, sec))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(json_rows(rows, args.shares), indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
