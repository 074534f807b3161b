"""Bytes each client sends per round and final accuracy: full-precision vs 16- and 8-bit updates, on the default
simulation (digits, 5 clients x 20 rounds, DP eps 8, SecAgg+ on), side by side. Under SecAgg+ ``--quantize B``
quantizes into the secure-aggregation field (2**B - 1 levels per client, modulus 2**(B + ceil(log2 clients))), and
the masked vectors travel in the narrowest unsigned type holding the modulus; the fp32 row is SecAgg+'s own
full-precision field (2**22 levels, modulus 2**32), which fedshield sends as uint32 (Flower's client: int64). Usage::

    python benchmarks/compression.py [--rounds 20] [--clients 5] [--seeds 0 1 2] [--no-secagg]

Each seed runs all three settings; the table shows medians over seeds, and the accuracy difference is the median of
the per-seed (paired) differences to fp32.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from fedshield.config import RunConfig
from fedshield.simulation.run import simulate
from fedshield.tasks import get_task

BITS = (0, 16, 8)


def _run(bits: int, seed: int, args: argparse.Namespace, tmp: Path) -> tuple[float, float, float]:
    """``(median bytes per client per round, final accuracy, wall seconds)`` of one run."""
    config = RunConfig(num_clients=args.clients, num_rounds=args.rounds, secagg=not args.no_secagg, quantize=bits,
                       seed=seed, out=tmp / f"q{bits}-s{seed}")
    start = time.monotonic()
    simulate(config)
    lines = [json.loads(x) for x in (config.out / "metrics.jsonl").read_text().splitlines()]
    nbytes = statistics.median(r["bytes_up_per_client"] for r in lines if r["bytes_up_per_client"] is not None)
    return nbytes, lines[-1]["accuracy"], time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-secagg", action="store_true", help="plain updates (client-side quantization)")
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    runs: dict[int, list[tuple[float, float, float]]] = {b: [] for b in BITS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for bits in BITS:
                runs[bits].append(_run(bits, seed, args, Path(tmp)))
                nbytes, acc, wall = runs[bits][-1]
                print(f"seed {seed} {bits or 32:>2}-bit: {nbytes:.0f} B/client/round, accuracy {100 * acc:.1f}%, "
                      f"{wall:.0f} s", flush=True)
    values = sum(v.numel() for v in get_task("digits").new_model(0).state_dict().values())
    base_bytes = statistics.median(r[0] for r in runs[0])
    mode = "plain updates (no SecAgg+)" if args.no_secagg else "SecAgg+ on"
    print(f"\ndefault digits run, {args.clients} clients x {args.rounds} rounds, DP eps 8, {mode}; "
          f"{values} model values ({4 * values} B as float32); median of {len(args.seeds)} seed(s) {args.seeds}")
    print(f"{'update':<8} {'bytes/client/round':>19} {'x fp32 run':>11} {'x float32':>10} {'accuracy':>9} "
          f"{'Δ acc (pts)':>12} {'wall s':>7}")
    for bits in BITS:
        nbytes = statistics.median(r[0] for r in runs[bits])
        acc = statistics.median(r[1] for r in runs[bits])
        delta = statistics.median(100 * (r[1] - b[1]) for r, b in zip(runs[bits], runs[0], strict=True))
        wall = statistics.median(r[2] for r in runs[bits])
        name = "fp32" if bits == 0 else f"{bits}-bit"
        print(f"{name:<8} {nbytes:>19.0f} {nbytes / base_bytes:>11.3f} {nbytes / (4 * values):>10.3f} "
              f"{100 * acc:>8.1f}% {delta:>+12.1f} {wall:>7.1f}")


if __name__ == "__main__":
    main()
