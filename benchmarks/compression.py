"""Bytes each client sends per round and final accuracy: float32 updates vs 8- and 16-bit quantized updates, on
the default simulation (without SecAgg+, whose field quantization sets its own size). Usage::

    python benchmarks/compression.py [--rounds 20] [--clients 5]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (0, 16, 8):
            config = RunConfig(num_clients=args.clients, num_rounds=args.rounds, secagg=False, quantize=bits,
                               out=Path(tmp) / f"q{bits}")
            start = time.monotonic()
            simulate(config)
            lines = [json.loads(x) for x in (config.out / "metrics.jsonl").read_text().splitlines()]
            rows.append((bits, statistics.median(r["bytes_up_per_client"] for r in lines), lines[-1]["accuracy"],
                         time.monotonic() - start))
    base_bytes, base_acc = rows[0][1], rows[0][2]
    print(f"default digits run, {args.clients} clients x {args.rounds} rounds, DP eps 8, no SecAgg+")
    print(f"{'update':<10} {'bytes/client/round':>19} {'x float32':>10} {'accuracy':>9} {'Δ acc (pts)':>12} {'wall s':>7}")
    for bits, nbytes, acc, wall in rows:
        name = "float32" if bits == 0 else f"{bits}-bit"
        print(f"{name:<10} {nbytes:>19.0f} {nbytes / base_bytes:>10.3f} {100 * acc:>8.1f}% {100 * (acc - base_acc):>+12.1f} {wall:>7.1f}")


if __name__ == "__main__":
    main()
