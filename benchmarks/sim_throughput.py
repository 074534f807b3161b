"""Simulation throughput (trained client-rounds per second) and peak memory: fedshield vs a stock Flower app.

Both run N virtual clients on Flower's simulation engine with 10% of them sampled for training each round, the same
model (fedshield's digits CNN), the same data and partitions, the same DP-SGD work per client (sample rate,
local epochs, learning rate, clipping bound and noise multiplier: fedshield's calibration for the run) and the same
engine settings (``run_simulation``, 1 CPU per client, no dashboard, Ray's logs kept off the driver, a private Ray
temp dir: what :func:`fedshield.simulation.run.simulate` sets), so only the app differs:

* ``fedshield``: :func:`fedshield.simulation.run.simulate` with a RunConfig (digits, DP on, ``fraction_train``
  0.1; SecAgg+ off unless ``--secagg``): ledgers on disk, ghost clipping, streaming aggregation, checkpoints;
* ``stock``: written the way Flower's own Opacus example (``examples/opacus``) is, on the Message API: every
  train call loads its partition (the partitioner is built once per process, like the example's global
  ``fds``), builds a new ``PrivacyEngine()`` (Opacus' defaults: PRV accountant, per-sample hooks), trains, and
  reports that round's epsilon; the server is ``flwr.serverapp.strategy.FedAvg(fraction_train=0.1)``.

Both evaluate on every client every round (Flower's default ``fraction_evaluate=1.0``) unless
``--fraction-evaluate F`` asks both for the same share: the round time includes it. fedshield's ``simulate`` also
replaces the engine's O(nodes x messages) dispatch sweep with one walk (:mod:`fedshield.simulation.dispatch`;
``benchmarks/sim_dispatch.py`` times that part alone); the stock app runs Flower's engine as shipped. Throughput = trained client-rounds / wall time of rounds 2..R (round 1 pays for Ray's
start and the imports), where a round runs from one ``evaluate_fn`` call to the next; a client that fails (an error
reply) is not counted, and the failures are reported. Peak memory = the largest
sum of RSS over the app's process tree (the app runs in a subprocess of its own; Ray's GCS, raylet and workers are
its descendants), sampled from /proc every 0.25 s; shared pages (libraries, Ray's object store) count once per
process that maps them, for both apps alike. Each repeat runs both apps, alternating which goes first; the table
shows medians over repeats.

Digits has 1,797 examples, enough for ~360 clients: for N > 100 the data set is tiled ceil(N / 100) times (task
``sim_throughput:digits_xK``, identical copies), so every client keeps ~11 training examples as at N = 100.
Usage::

    python benchmarks/sim_throughput.py [--clients 100] [--rounds 3] [--repeats 2] [--secagg] [--fraction-evaluate F]
                                        [--json OUT]
    python benchmarks/sim_throughput.py --clients 100 1000 10000 --rounds 4 4 2   # one --rounds per N
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

APPS = ("fedshield", "stock")
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the stock app lives beside this script (run as a script, or loaded from a file)
    sys.path.insert(0, str(HERE))

from sim_stock_app import FRACTION_TRAIN, load_partition, run_stock  # noqa: E402,F401 (load_partition: re-exported)
CLIENTS_PER_COPY = 100  # digits is tiled once per this many clients
SAMPLE_EVERY_S = 0.25


# ---------------------------------------------------------------------------------------------------------------
# The data: digits, tiled for many clients (a task factory that Ray workers import as sim_throughput:digits_xK)


def task_name(n: int) -> str:
    copies = math.ceil(n / CLIENTS_PER_COPY)
    return "digits" if copies == 1 else f"sim_throughput:digits_x{copies}"


def __getattr__(name: str) -> Callable[[], Any]:
    """``digits_xK``: a factory of the digits task with its data tiled K times (for ``--task module:factory``)."""
    if name.startswith("digits_x") and name[len("digits_x"):].isdigit():
        copies = int(name[len("digits_x"):])
        return lambda: _tiled_digits(copies)
    raise AttributeError(name)


def _tiled_digits(copies: int) -> Any:
    from fedshield.dataspec import DataSpec, Dataset
    from fedshield.tasks import Task, get_task

    digits = get_task("digits")

    @lru_cache(maxsize=1)
    def load() -> Dataset:
        data = digits.load_bundled()  # type: ignore[misc]
        return Dataset(np.concatenate([data.x] * copies), np.concatenate([data.y] * copies))

    spec = DataSpec(f"digits-x{copies}", digits.spec.input_shape, digits.spec.num_classes)
    return Task(spec=spec, build_model=digits.build_model, load_bundled=load, preprocess=digits.preprocess,
                channels_last=digits.channels_last)


# ---------------------------------------------------------------------------------------------------------------
# The two apps, each run in a worker subprocess


def _config(n: int, rounds: int, seed: int, secagg: bool, out: Path, fraction_evaluate: float = 1.0) -> Any:
    from fedshield.config import RunConfig

    return RunConfig(task=task_name(n), num_clients=n, num_rounds=rounds, dp=True, secagg=secagg,
                     fraction_train=FRACTION_TRAIN, fraction_evaluate=fraction_evaluate, seed=seed, out=out)


def run_fedshield(n: int, rounds: int, seed: int, secagg: bool, tmp: Path, ray_tmp: str, fraction_evaluate: float
                  ) -> dict[str, Any]:
    from fedshield.simulation.run import simulate

    config = _config(n, rounds, seed, secagg, tmp / "run", fraction_evaluate)
    summary = simulate(config, ray_temp_dir=ray_tmp)
    rows = [json.loads(x) for x in (config.out / "metrics.jsonl").read_text().splitlines()]
    return {"round_s": [r["round_time_s"] for r in rows], "trained": [r["clients_trained"] for r in rows],
            "failed": [r["clients_sampled"] - r["clients_trained"] for r in rows], "errors": [],
            "sigma": summary.noise_multiplier}


def worker(app: str, n: int, rounds: int, seed: int, secagg: bool, fraction_evaluate: float) -> dict[str, Any]:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every round at INFO; same for both apps
    tmp = Path(tempfile.mkdtemp(prefix="fsbst-"))  # fedshield's run directory (client ledgers, checkpoints)
    ray_tmp = tempfile.mkdtemp(prefix="fsr")  # its own, short: Ray's socket paths must fit in 107 bytes
    start = time.perf_counter()
    try:
        if app == "fedshield":
            out = run_fedshield(n, rounds, seed, secagg, tmp, ray_tmp, fraction_evaluate)
        else:
            out = run_stock(_config(n, rounds, seed, False, Path("unused"), fraction_evaluate), ray_tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out["wall_s"] = time.perf_counter() - start
    return out


# ---------------------------------------------------------------------------------------------------------------
# Measuring: one subprocess per run, its process tree's RSS sampled from /proc


def _tree_rss(root: int) -> tuple[int, int]:
    """``(bytes of RSS summed over root and its live descendants, number of processes)``."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * page
        except (OSError, IndexError, ValueError):
            continue
    tree, frontier = {root}, {root}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return sum(rss.get(p, 0) for p in tree), len(tree & rss.keys())


def measure(app: str, n: int, rounds: int, seed: int, secagg: bool, timeout: float, fraction_evaluate: float
            ) -> dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [env.get("PYTHONPATH")])])  # Ray workers too
    cmd = [sys.executable, __file__, "--worker", app, str(n), str(rounds), str(seed),
           "--fraction-evaluate", repr(fraction_evaluate)] + (["--secagg"] if secagg else [])
    # A session of its own, so a timeout or Ctrl-C takes down the run's whole process group.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    peak, procs, done = [0], [0], threading.Event()

    def sample() -> None:
        while not done.wait(SAMPLE_EVERY_S):
            rss, count = _tree_rss(proc.pid)
            peak[0], procs[0] = max(peak[0], rss), max(procs[0], count)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except BaseException as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(f"{app} N={n}: no result within {timeout:.0f} s") from None
        raise
    finally:
        done.set()
        sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{app} N={n} failed (exit {proc.returncode}):\n{stderr[-3000:]}")
    out = json.loads(stdout.strip().splitlines()[-1])
    if sum(out["failed"]):  # counted out of the throughput (only trained client-rounds count), and reported
        print(f"{app} N={n}: {sum(out['failed'])} client-round(s) failed {out['errors']}", flush=True)
    steady_s, steady_n = out["round_s"][1:] or out["round_s"], out["trained"][1:] or out["trained"]
    out.update(throughput=sum(steady_n) / sum(steady_s), peak_rss_mib=peak[0] / 2**20, max_processes=procs[0])
    return out


def _evaluated(n: int, fraction_evaluate: float) -> int:
    """Clients asked to evaluate per round, the same for both apps here (Flower: max(int(n f), 2); ours: round)."""
    return max(int(n * fraction_evaluate), 2) if fraction_evaluate else 0


def _rows(n: int, rounds: int, runs: dict[str, list[dict[str, Any]]], secagg: bool, fraction_evaluate: float
          ) -> list[dict[str, Any]]:
    def med(app: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[app])

    repeats = len(runs["fedshield"])
    common = {"repeats": repeats, "rounds": rounds, "clients_per_round": max(1, round(n * FRACTION_TRAIN)),
              "task": task_name(n), "secagg": secagg, "fraction_evaluate": fraction_evaluate,
              "clients_evaluated_per_round": _evaluated(n, fraction_evaluate),
              "first_round_s": {a: med(a, "first_round_s") for a in APPS},
              "steady_round_s": {a: med(a, "steady_round_s") for a in APPS},
              "wall_s": {a: med(a, "wall_s") for a in APPS},
              "failed_client_rounds": {a: sum(sum(r["failed"]) for r in runs[a]) for a in APPS},
              "errors": {a: [e for r in runs[a] for e in r["errors"]][:5] for a in APPS}}
    failed = ", ".join(f"{a}: {k}" for a, k in common["failed_client_rounds"].items() if k)
    notes = {
        "throughput": f"{common['clients_per_round']} of {n} clients trained and "
                      f"{'all' if fraction_evaluate == 1 else common['clients_evaluated_per_round']} evaluated per round; rounds "
                      f"2..{rounds}; task {common['task']}; fedshield SecAgg+ {'on' if secagg else 'off'}"
                      + (f"; FAILED client-rounds (not counted) {failed}" if failed else ""),
        "peak_rss_mib": "RSS summed over the process tree (Ray's GCS, raylet, workers); shared pages once per process",
    }
    rows = []
    for name, key, unit, better in (("client-rounds/s", "throughput", "client-rounds/s", "higher"),
                                    ("peak RSS", "peak_rss_mib", "MiB", "lower")):
        ours, base = med("fedshield", key), med("stock", key)
        rows.append({"name": f"{name}, N={n}", "ours": ours, "baseline": base, "unit": unit,
                     "ratio": ours / base if base else None,
                     "detail": {**common, "better": better, "note": notes[key],
                                "ours_runs": [r[key] for r in runs["fedshield"]],
                                "baseline_runs": [r[key] for r in runs["stock"]]}})
    return rows


def write_json(path: str, rows: list[dict[str, Any]]) -> None:
    Path(path).write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100])
    parser.add_argument("--rounds", type=int, nargs="+", default=[3], help="one value, or one per --clients (>= 2)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--secagg", action="store_true", help="fedshield with SecAgg+ (the stock app has none)")
    parser.add_argument("--fraction-evaluate", type=float, nargs="+", default=[1.0],
                        help="share of clients both apps ask to evaluate each round (default 1.0, Flower's default); "
                             "one value, or one per --clients")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        app, n, rounds, seed = args.worker[0], *map(int, args.worker[1:])
        print(json.dumps(worker(app, n, rounds, seed, args.secagg, args.fraction_evaluate[0])))
        return
    rounds = args.rounds * len(args.clients) if len(args.rounds) == 1 else args.rounds
    if len(rounds) != len(args.clients) or min(rounds) < 2:
        parser.error("--rounds: one value >= 2, or one per --clients")
    fe = args.fraction_evaluate
    fractions = fe * len(args.clients) if len(fe) == 1 else fe
    if len(fractions) != len(args.clients) or not all(0 <= f <= 1 for f in fractions):
        parser.error("--fraction-evaluate: one value in [0, 1], or one per --clients")
    print(f"{os.cpu_count()} CPUs; digits CNN, DP-SGD (fedshield's settings), {FRACTION_TRAIN:.0%} of clients "
          f"trained per round, {'/'.join(f'{f:.0%}' for f in fractions)} evaluated; fedshield SecAgg+ {'on' if args.secagg else 'off'}; "
          f"median of {args.repeats} repeat(s); throughput over rounds 2..R")
    print(f"{'N':>6} {'R':>2} {'app':<10} {'client-rounds/s':>15} {'s/round':>8} {'round 1 s':>9} "
          f"{'peak RSS MiB':>12} {'procs':>5} {'wall s':>7} {'failed':>6}")
    rows: list[dict[str, Any]] = []
    for n, r, fraction in zip(args.clients, rounds, fractions, strict=True):
        runs: dict[str, list[dict[str, Any]]] = {a: [] for a in APPS}
        for repeat in range(args.repeats):
            for app in APPS if repeat % 2 == 0 else APPS[::-1]:
                res = measure(app, n, r, args.seed, args.secagg, args.timeout, fraction)
                res["first_round_s"] = res["round_s"][0]
                res["steady_round_s"] = statistics.median(res["round_s"][1:])
                runs[app].append(res)
                print(f"{n:>6} {r:>2} {app:<10} {res['throughput']:>15.2f} {res['steady_round_s']:>8.2f} "
                      f"{res['first_round_s']:>9.1f} {res['peak_rss_mib']:>12.0f} {res['max_processes']:>5} "
                      f"{res['wall_s']:>7.1f} {sum(res['failed']):>6}", flush=True)
        new = _rows(n, r, runs, args.secagg, fraction)
        rows += new
        print(f"{n:>6} {'':>2} {'ratio':<10} {new[0]['ratio']:>15.2f} (fedshield / stock, medians); "
              f"peak RSS ratio {new[1]['ratio']:.2f}", flush=True)
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
