"""fedshield against Apple's pfl-research (``pfl`` 0.6.0) on issue 13's job, the same split, model, initial weights and
hyperparameters on both sides.

The job: digits, fedshield's DigitsCNN, N clients from fedshield's IID split (seed 0), 10% (10 of 100) sampled per
round, 1 local epoch of plain SGD (lr 0.5, batch ceil(0.5 x rows) = 6), FedAvg, R rounds, server-side evaluation
after every round and no client-side evaluation; without DP and with central client-level DP (each update clipped
to C = 1, N(0, (zC)^2) with z = 0.3 on the sum). Digits (1,797 images) holds ~100 clients of ~11 training rows; for
N > 100 it is tiled ceil(N / 100) times (``sim_throughput:digits_xK``, as ``sim_throughput.py`` does), so every
client keeps ~11 rows; the server test set then holds copies of training images, on both sides alike.

- fedshield: the product's own path, ``python -m fedshield simulate ... --no-secagg --no-dp [--client-dp central
  --client-noise-multiplier 0.3 --client-clip-norm 1] --backend local|ray`` in a fresh process (the CLI's run
  directory, report and plots included), read back from its ``metrics.jsonl``; one side per ``--backends`` entry
  (default both: forked local workers, and Ray).
- pfl: ``benchmarks/pfl_peer_side.py`` in the benchmark's own virtualenv (``--setup`` makes it under
  ``benchmarks/.pfl-venv``, git-ignored; pfl is never a fedshield dependency). This process first exports the job
  from fedshield's own code (``bundled_split``, ``Task.new_model(seed)``) into a temporary directory: the initial
  weights, every client's training rows, the server test set and the initial logits, which the pfl side checks
  its copy of DigitsCNN against. See that script for how pfl is set up.

Reported per side (each run a fresh process; medians over ``--repeats``; the sides alternate who runs first):
s/round (median of rounds 2..R: round 1 pays for starting the backend on fedshield's side), client-rounds/s (clients trained
in rounds 2..R over their wall time), whole-process time (start to exit, imports and teardown included), start to
the end of round 1, and the final server test accuracy. Figures taken on a loaded machine are upper bounds:
compare the ratios within one run.

Usage::

    python benchmarks/pfl_peer.py --setup                      # once: the pfl virtualenv (torch 2.13.0 CPU + pfl)
    python benchmarks/pfl_peer.py [--clients 100 1000] [--rounds 20] [--settings nodp central] [--repeats 1]
                                  [--backends local ray] [--json OUT]
    python benchmarks/pfl_peer.py --quick                      # 100 clients, 2 rounds, no DP
    python benchmarks/pfl_peer.py --quick --only fedshield     # fedshield's side alone (no pfl needed)
"""

from __future__ import annotations

import argparse
import json
import math
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
ROOT = HERE.parent
VENV = HERE / ".pfl-venv"
PFL_PINS = ("torch==2.13.0", "pfl[pytorch]==0.6.0")
SIDES = ("fedshield", "pfl")
JOB = {"seed": 0, "fraction": 0.1, "lr": 0.5, "sample_rate": 0.5, "z": 0.3, "clip": 1.0, "delta": 1e-5}
CLIENTS_PER_COPY = 100  # digits is tiled once per this many clients (as in sim_throughput.py)


# ---------------------------------------------------------------------------------------------------------------
# The pfl virtualenv


def venv_python(venv: Path = VENV) -> Path:
    return venv / "bin" / "python"


def setup(venv: Path = VENV) -> None:
    """Make ``venv`` with torch 2.13.0 (the CPU wheel pip finds locally) first, then pfl; fail if pip swapped torch."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--quiet"]
    for pin in PFL_PINS:
        subprocess.run([*pip, pin], check=True)
    probe = "import torch, pfl.model.pytorch; from importlib.metadata import version; print(torch.__version__, version('pfl'))"
    got = subprocess.run([str(venv_python(venv)), "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    if not got[0].startswith("2.13.0") or got[1] != "0.6.0":
        raise SystemExit(f"{venv}: expected torch 2.13.0 and pfl 0.6.0, got {got}: delete it and rerun --setup")
    print(f"{venv}: torch {got[0]}, pfl {got[1]}")


# ---------------------------------------------------------------------------------------------------------------
# The job, exported from fedshield's own code


def task_name(clients: int) -> str:
    copies = math.ceil(clients / CLIENTS_PER_COPY)
    return "digits" if copies == 1 else f"sim_throughput:digits_x{copies}"


def export_job(clients: int, out: Path) -> dict[str, Any]:
    """Write ``job.npz``/``job.json`` (see the module docstring) from fedshield's split and initial model."""
    import numpy as np
    import torch

    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # sim_throughput:digits_xK
    from fedshield.client.site import bundled_split
    from fedshield.tasks import get_task

    task = task_name(clients)
    split = bundled_split(task, "iid", clients, JOB["seed"])
    trains = [train for train, _test in split.clients]
    batches = {max(1, math.ceil(len(t) * JOB["sample_rate"])) for t in trains}
    if len(batches) != 1:
        raise SystemExit(f"{clients} clients get batch sizes {sorted(batches)}: pfl takes one; choose another --clients")
    model = get_task(task).new_model(JOB["seed"])
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(torch.from_numpy(split.server_test.x)).numpy()
    offsets = np.cumsum([0] + [len(t) for t in trains])
    np.savez(out / "job.npz", train_x=np.concatenate([t.x for t in trains]),
             train_y=np.concatenate([t.y for t in trains]), offsets=offsets, test_x=split.server_test.x,
             test_y=split.server_test.y, init_logits=logits, **{f"init/{k}": v for k, v in state.items()})
    meta = {**JOB, "task": task, "num_clients": clients, "cohort": round(JOB["fraction"] * clients),
            "batch_size": batches.pop(), "num_params": sum(p.numel() for p in model.parameters()),
            "state_shapes": {k: list(v.shape) for k, v in state.items()}, "test_rows": len(split.server_test)}
    (out / "job.json").write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------------------------------------------------------
# One run of each side, in a fresh process


def fedshield_command(meta: dict[str, Any], setting: str, rounds: int, out: Path, backend: str | None = None
                      ) -> list[str]:
    cmd = [sys.executable, "-m", "fedshield", "simulate", "--clients", str(meta["num_clients"]), "--rounds",
           str(rounds), "--task", meta["task"], "--partition", "iid", "--no-dp", "--no-secagg", "--local-epochs", "1",
           "--fraction-train", str(meta["fraction"]), "--fraction-evaluate", "0", "--lr", str(meta["lr"]),
           "--sample-rate", str(meta["sample_rate"]), "--seed", str(meta["seed"]), "--out", str(out)]
    if backend:
        cmd += ["--backend", backend]
    if setting == "central":
        cmd += ["--client-dp", "central", "--client-noise-multiplier", str(meta["z"]),
                "--client-clip-norm", str(meta["clip"])]
    return cmd


def _env(tmp: Path) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "TMPDIR": str(tmp), "RAY_TMPDIR": str(tmp),
            "FLWR_TELEMETRY_ENABLED": "0", "PFL_PYTORCH_DEVICE": "cpu"}


def run_fedshield(meta: dict[str, Any], setting: str, rounds: int, timeout: float, backend: str | None = None
                  ) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="fspp-"))  # keep TMPDIR short: Ray's socket paths must fit 107 bytes
    metrics = tmp / "run" / "metrics.jsonl"
    try:
        start = time.time()
        proc = subprocess.Popen(fedshield_command(meta, setting, rounds, tmp / "run", backend), env=_env(tmp), cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first_round_end = _watch_first_round(proc, metrics, start + timeout)
        output, _ = proc.communicate(timeout=max(1.0, start + timeout - time.time()))
        wall = time.time() - start
        if proc.returncode != 0:
            raise RuntimeError(f"fedshield {setting} failed (exit {proc.returncode}): {output[-3000:]}")
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        client_level = json.loads((metrics.parent / "privacy.json").read_text()).get("client_level", {})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = _summary([r["round_time_s"] for r in rows], [r["clients_trained"] for r in rows],
                      rows[-1]["accuracy"], wall, first_round_end - start)
    # fedshield accounts fixed-size client sampling at q = 1 (zero-out adjacency, no amplification): its epsilon is
    # not pfl's (q = cohort / N), although the noise added is the same.
    return {**result, "epsilon": client_level.get("epsilon"), "epsilon_q": client_level.get("sample_rate")}


def _watch_first_round(proc: subprocess.Popen[str], metrics: Path, deadline: float) -> float:
    """When ``metrics.jsonl`` first holds a row (the CLI writes it atomically after each round)."""
    while proc.poll() is None and time.time() < deadline:
        try:
            if metrics.stat().st_size > 0:
                return time.time()
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    return time.time()


def run_pfl(job_dir: Path, setting: str, rounds: int, timeout: float, python: Path, threads: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="fspp-"))
    # Ray gives each fedshield client actor OMP_NUM_THREADS=1 (its num_cpus); pfl trains in one process, with
    # torch's default of one thread per core unless told: --pfl-threads 1 matches the clients' setting.
    env = {**_env(tmp), **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    try:
        start = time.time()
        proc = subprocess.run([str(python), str(HERE / "pfl_peer_side.py"), str(job_dir), setting, str(rounds)],
                              env=env, cwd=tmp, capture_output=True, text=True, timeout=timeout, check=False)
        wall = time.time() - start
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pfl {setting} failed (exit {proc.returncode}): {proc.stderr[-3000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    result = _summary(out["round_s"], out["trained"], out["accuracy"][-1], wall, out["first_round_end"] - start)
    return {**result, "epsilon": out["epsilon"], "torch_threads": out["torch_threads"],
            "versions": {"pfl": out["pfl"], "torch": out["torch"]}}


def _summary(round_s: list[float], trained: list[int], accuracy: float, wall: float, first: float) -> dict[str, Any]:
    later, later_trained = round_s[1:] or round_s, trained[1:] or trained
    return {"s_per_round": statistics.median(later), "client_rounds_per_s": sum(later_trained) / sum(later),
            "wall_s": wall, "first_round_s": first, "accuracy": accuracy, "rounds": len(round_s),
            "trained": sum(trained)}


# ---------------------------------------------------------------------------------------------------------------
# Report

SETTING_NAMES = {"nodp": "no DP", "central": "central client-level DP (C 1, z 0.3)"}
#: key, unit, which way is better, format
KEYS = (("s_per_round", "s", "lower", "{:.3f}"), ("client_rounds_per_s", "client-rounds/s", "higher", "{:.1f}"),
        ("wall_s", "s", "lower", "{:.1f}"), ("first_round_s", "s", "lower", "{:.1f}"),
        ("accuracy", "fraction", "higher", "{:.1%}"))


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _ours(results: dict[tuple[int, str, str], list[dict[str, Any]]], clients: int, setting: str) -> list[str]:
    """fedshield's sides of one (clients, setting): ``fedshield`` or ``fedshield:<backend>`` (one per backend)."""
    return sorted(side for n, s, side in results if (n, s) == (clients, setting) and side.startswith("fedshield"))


def _label(side: str) -> str:
    backend = side.partition(":")[2]
    return f"fedshield --backend {backend}" if backend else "fedshield"


def table(results: dict[tuple[int, str, str], list[dict[str, Any]]]) -> str:
    """Markdown: one row per (clients, setting, fedshield backend), fedshield and pfl side by side, fedshield / pfl
    ratios."""
    lines = ["| clients | setting | side | s/round fedshield / pfl | client-rounds/s fedshield / pfl (ratio) "
             "| whole process fedshield / pfl | start to end of round 1 fedshield / pfl | accuracy fedshield / pfl |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    for (clients, setting) in sorted({(n, s) for n, s, _ in results}):
        peer = results.get((clients, setting, "pfl"))
        for side in _ours(results, clients, setting) or ["fedshield"]:
            ours = results.get((clients, setting, side))
            cells = []
            for key, _unit, _better, fmt in KEYS:
                a = fmt.format(_median(ours, key)) if ours else "-"
                b = fmt.format(_median(peer, key)) if peer else "-"
                if key == "client_rounds_per_s" and ours and peer:
                    b += f" (**{_median(ours, key) / _median(peer, key):.2f}x**)"
                cells.append(f"{a} / {b}" + (" s" if key in ("wall_s", "first_round_s") else ""))
            lines.append(f"| {clients} | {SETTING_NAMES[setting]} | {_label(side)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def json_rows(results: dict[tuple[int, str, str], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for (clients, setting) in sorted({(n, s) for n, s, _ in results}):
        peer = results.get((clients, setting, "pfl"))
        for side in _ours(results, clients, setting):
            ours = results[(clients, setting, side)]
            if not (ours and peer):
                continue
            for key, unit, better, _fmt in KEYS:
                a, b = _median(ours, key), _median(peer, key)
                rows.append({"name": f"pfl peer {key} ({setting}), {clients} clients, {_label(side)} vs pfl 0.6.0",
                             "ours": a, "baseline": b, "unit": unit, "ratio": a / b if b else 0.0,
                             "detail": {"better": better, "repeats": len(ours), "baseline_is": "pfl 0.6.0",
                                        "rounds": ours[0]["rounds"], "pfl_epsilon": peer[0].get("epsilon"),
                                        "fedshield_epsilon": ours[0].get("epsilon")}})
    return rows


# ---------------------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict[tuple[int, str, str], list[dict[str, Any]]]:
    results: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for clients in args.clients:
        job_dir = Path(tempfile.mkdtemp(prefix="fspp-job-"))
        try:
            meta = export_job(clients, job_dir)
            for i in range(args.repeats):
                for setting in args.settings:
                    sides = [f"fedshield:{b}" if side == "fedshield" else side
                             for side in args.only for b in (args.backends if side == "fedshield" else [None])]
                    for side in (sides if i % 2 == 0 else sides[::-1]):
                        result = (run_fedshield(meta, setting, args.rounds, args.timeout, side.partition(":")[2])
                                  if side.startswith("fedshield")
                                  else run_pfl(job_dir, setting, args.rounds, args.timeout, Path(args.pfl_python),
                                               args.pfl_threads))
                        print(f"{clients} {setting} {side}: {json.dumps(result)}", flush=True)
                        results.setdefault((clients, setting, side), []).append(result)
        finally:
            shutil.rmtree(job_dir, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help=f"make the pfl virtualenv ({VENV}) and exit")
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTING_NAMES), default=["nodp", "central"])
    parser.add_argument("--only", nargs="+", choices=SIDES, default=list(SIDES), help="run only these sides")
    parser.add_argument("--backends", nargs="+", choices=("local", "ray"), default=None,
                        help="fedshield's simulation backends, each a side of its own (default: both; --quick: local)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="100 clients, 2 rounds, no DP (a smoke run)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    parser.add_argument("--pfl-python", default=str(venv_python()), help="the python of pfl's virtualenv")
    parser.add_argument("--pfl-threads", type=int, default=1,
                        help="OMP_NUM_THREADS for pfl's process (default 1, as Ray gives each fedshield client; "
                             "0: torch's default)")
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    args = parser.parse_args()
    if args.setup:
        setup()
        return
    if args.quick:
        args.clients, args.rounds, args.settings = [100], 2, ["nodp"]
    if args.backends is None:
        args.backends = ["local"] if args.quick else ["local", "ray"]
    if "pfl" in args.only and not Path(args.pfl_python).exists():
        raise SystemExit(f"no pfl virtualenv at {args.pfl_python}: run python benchmarks/pfl_peer.py --setup first "
                         "(or --only fedshield)")
    print(f"{os.cpu_count()} CPUs, load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at start; "
          f"clients {args.clients}, {args.rounds} rounds, medians of {args.repeats} repeat(s)", flush=True)
    results = measure(args)
    print(table(results))
    print(f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())} at end")
    if args.json:
        Path(args.json).write_text(json.dumps(json_rows(results), indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
