"""Simulation rounds bounded by work: ``fedshield simulate`` with the engine's fixed ticks (before) and with the
event-driven hand-offs of :mod:`fedshield.simulation.wake` (after), in the same run.

The job is issue 13's: digits, fedshield's DigitsCNN, N clients (IID), 10% sampled per round, 1 local epoch of SGD
(lr 0.5, sample rate 0.5: batches of ~6), FedAvg, server-side evaluation only, no SecAgg+; without DP and with
central client-level DP (C 1, z 0.3). Each run is a fresh subprocess (imports, Ray start and shutdown included in
its whole-process time). "ticks" runs the same code with :func:`~fedshield.simulation.wake.event_driven_link`
replaced by a no-op, which is exactly the code before it: the dispatcher then wakes only on its 0.1 s fallback and
the ServerApp's grid sleeps ``PULL_INTERVAL_S`` (0.2 s) between pulls. Modes alternate within each repeat.

Reported per mode: s/round (median of rounds 2..R: round 1 pays for Ray's actors), client-rounds/s (trained
client-rounds of rounds 2..R over their wall time), whole-process time, start to the end of round 1, and final
server-side accuracy. Figures measured on a loaded machine are upper bounds; compare the ratio within one run.

Usage::

    python benchmarks/sim_rounds.py [--clients 100] [--rounds 20] [--repeats 1] [--settings nodp central]
                                    [--json OUT]
    python benchmarks/sim_rounds.py --quick        # 10 clients, 2 rounds, no DP: the smoke test's run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MODES = ("ticks", "event")
SETTINGS = {"nodp": {}, "central": {"client_dp": "central", "client_noise_multiplier": 0.3, "client_clip_norm": 1.0}}


def worker(mode: str, setting: str, clients: int, rounds: int, out: Path) -> dict[str, Any]:
    """One run in this process; prints nothing but the result line."""
    import logging
    from contextlib import nullcontext

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from fedshield.config import RunConfig
    from fedshield.simulation import wake
    from fedshield.simulation.run import simulate

    if mode == "ticks":
        wake.event_driven_link = nullcontext  # type: ignore[assignment]  # the code before: fixed ticks only
    config = RunConfig(task="digits", num_clients=clients, num_rounds=rounds, dp=False, secagg=False,
                       fraction_train=0.1, fraction_evaluate=0.0, local_epochs=1, lr=0.5, sample_rate=0.5, seed=0,
                       out=out, **SETTINGS[setting])
    ends: list[float] = []
    ray_tmp = tempfile.mkdtemp(prefix="fsr")  # its own, short: Ray's socket paths must fit in 107 bytes
    try:
        summary = simulate(config, on_round=lambda _record: ends.append(time.time()), ray_temp_dir=ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    rows = summary.rounds
    return {"first_round_end": ends[0], "round_s": [r["round_time_s"] for r in rows],
            "trained": [r["clients_trained"] for r in rows], "accuracy": rows[-1]["accuracy"]}


def measure(mode: str, setting: str, clients: int, rounds: int, timeout: float) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="fssr-"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, setting, str(clients), str(rounds),
           str(tmp / "run")]
    start = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        wall = time.time() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{mode}/{setting} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    later = out["round_s"][1:] or out["round_s"]
    trained = out["trained"][1:] or out["trained"]
    return {"wall_s": wall, "first_round_s": out["first_round_end"] - start, "s_per_round": statistics.median(later),
            "client_rounds_per_s": sum(trained) / sum(later), "accuracy": out["accuracy"]}


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def report(results: dict[tuple[str, str], list[dict[str, Any]]], settings: list[str], clients: int) -> list[dict]:
    print(f"{'setting':8} {'mode':6} {'s/round':>8} {'client-rounds/s':>16} {'whole process s':>16} "
          f"{'to round 1 s':>13} {'accuracy':>9}")
    rows: list[dict[str, Any]] = []
    for setting in settings:
        for mode in MODES:
            runs = results[(setting, mode)]
            print(f"{setting:8} {mode:6} {_median(runs, 's_per_round'):8.3f} {_median(runs, 'client_rounds_per_s'):16.1f} "
                  f"{_median(runs, 'wall_s'):16.1f} {_median(runs, 'first_round_s'):13.1f} "
                  f"{_median(runs, 'accuracy'):9.1%}")
        before, after = results[(setting, "ticks")], results[(setting, "event")]
        for key, unit, better in (("s_per_round", "s", "lower"), ("client_rounds_per_s", "client-rounds/s", "higher"),
                                  ("wall_s", "s", "lower"), ("first_round_s", "s", "lower")):
            ours, base = _median(after, key), _median(before, key)
            rows.append({"name": f"simulate {key} ({setting}), {clients} clients, event-driven vs fixed ticks",
                         "ours": ours, "baseline": base, "unit": unit, "ratio": ours / base,
                         "detail": {"better": better, "repeats": len(after), "ours_is": "event-driven hand-offs",
                                    "baseline_is": "0.1 s dispatch tick + 0.2 s reply pull",
                                    "accuracy": [_median(after, "accuracy"), _median(before, "accuracy")]}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["nodp", "central"])
    parser.add_argument("--quick", action="store_true", help="10 clients, 2 rounds, no DP (the smoke test)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, setting, clients, rounds, out = args.worker
        print(json.dumps(worker(mode, setting, int(clients), int(rounds), Path(out))))
        return
    if args.quick:
        args.clients, args.rounds, args.repeats, args.settings = 10, 2, 1, ["nodp"]
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; {args.clients} clients, "
          f"{args.rounds} rounds, medians of {args.repeats} repeat(s)", flush=True)
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for i in range(args.repeats):
        for setting in args.settings:
            for mode in (MODES if i % 2 == 0 else MODES[::-1]):
                results.setdefault((setting, mode), []).append(
                    measure(mode, setting, args.clients, args.rounds, args.timeout))
    rows = report(results, args.settings, args.clients)
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
