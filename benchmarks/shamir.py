"""Shamir secret sharing for SecAgg+: fedshield's (:mod:`fedshield.crypto.shamir`) vs Flower 1.39's
(PyCryptodome), same secrets, same shares format, in the same run.

Per SecAgg+ round each client splits two 32-byte secrets into one share per neighbour (threshold = 66% of them,
the default), and the server rebuilds one secret per client from ``threshold`` shares. Usage::

    python benchmarks/shamir.py [--neighbours 10 100 1000] [--repeats 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any


def _time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbours", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    args = parser.parse_args()
    from flwr.common.secure_aggregation.crypto import shamir as flower

    from fedshield.crypto import shamir as ours

    secret = os.urandom(32)
    print(f"32-byte secret, threshold = max(2, round(0.66 n)); median of {args.repeats}; seconds")
    print(f"{'n':>6} {'split Flower':>13} {'split ours':>11} {'rebuild Flower':>15} {'rebuild ours':>13} "
          f"{'rebuild ours, cached':>21}")
    rows = []
    for n in args.neighbours:
        t = max(2, round(0.66 * n))
        shares = ours.create_shares(secret, t, n)
        if flower.combine_shares(shares[:t]) != secret or ours.combine_shares(flower.create_shares(secret, t, n)[:t]) != secret:
            raise RuntimeError("the implementations disagree")
        split_f = _time(lambda: flower.create_shares(secret, t, n), args.repeats)
        split_o = _time(lambda: ours.create_shares(secret, t, n), args.repeats)
        comb_f = _time(lambda: flower.combine_shares(shares[:t]), args.repeats)

        def cold() -> None:
            ours._lagrange_at_zero.cache_clear()
            ours.combine_shares(shares[:t])

        comb_o = _time(cold, args.repeats)
        comb_c = _time(lambda: ours.combine_shares(shares[:t]), args.repeats)
        print(f"{n:>6} {split_f:>13.4f} {split_o:>11.4f} {comb_f:>15.4f} {comb_o:>13.4f} {comb_c:>21.5f}", flush=True)
        for what, o, f in (("split", split_o, split_f), ("rebuild", comb_o, comb_f),
                           ("rebuild, weights cached", comb_c, comb_f)):
            rows.append({"name": f"Shamir {what}, {n} shares (threshold {t})", "ours": o, "baseline": f, "unit": "s",
                         "ratio": o / f, "detail": {"better": "lower", "repeats": args.repeats,
                                                    "ours_is": "fedshield.crypto.shamir",
                                                    "baseline_is": "flwr.common.secure_aggregation.crypto.shamir",
                                                    "note": f"32-byte secret; median of {args.repeats}"}})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
