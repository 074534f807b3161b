"""PRV accounting with Opacus' per-order RDP memoised (``fedshield/privacy/rdp_memo.py``) vs Opacus as shipped,
same process, same histories, same BLAS threads; the values are checked equal before any time is reported.

Two costs a run pays: the noise calibration before round 1 (Opacus' ``get_noise_multiplier`` bisection, PRV) and
the epsilon of each round's report (the history grows by one round of the same ``(sigma, q)``). Usage::

    python benchmarks/accounting_memo.py [--sample-rate 0.5] [--steps-per-round 4] [--rounds 20] \\
        [--target-epsilon 8] [--parts calibration epsilon] [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _plain_calibration(target: float, delta: float, q: float, steps: int) -> float:
    from opacus.accountants.utils import get_noise_multiplier
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return float(get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                          accountant="prv", epsilon_tolerance=0.01))


def _plain_epsilons(sigma: float, q: float, steps: int, rounds: int, delta: float) -> list[float]:
    from opacus.accountants import create_accountant
    from threadpoolctl import threadpool_limits

    out = []
    with threadpool_limits(limits=1, user_api="blas"):
        for r in range(1, rounds + 1):
            acc = create_accountant(mechanism="prv")
            acc.history = [(sigma, q, steps * r)]
            out.append(float(acc.get_epsilon(delta=delta)))
    return out


def _ours_fresh() -> None:
    """Forget every cache, as a new server process starts."""
    from fedshield.privacy import accounting, rdp_memo

    accounting._epsilon_cached.cache_clear()
    accounting.calibrate_noise_multiplier.cache_clear()
    rdp_memo._memos.clear()


def _timed(fn: Any) -> tuple[float, Any]:
    start = time.process_time()
    value = fn()
    return time.process_time() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-rate", type=float, default=0.5)
    parser.add_argument("--steps-per-round", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--target-epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--parts", nargs="+", default=["calibration", "epsilon"], choices=["calibration", "epsilon"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    from fedshield.privacy.accounting import calibrate_noise_multiplier, epsilon

    q, k, rounds, delta = args.sample_rate, args.steps_per_round, args.rounds, args.delta
    horizon = k * rounds
    rows: list[dict[str, Any]] = []
    times: dict[str, list[float]] = {"cal plain": [], "cal ours": [], "eps plain": [], "eps ours": []}
    sigma = None
    for _ in range(args.repeats):
        if "calibration" in args.parts:
            t_plain, s_plain = _timed(lambda: _plain_calibration(args.target_epsilon, delta, q, horizon))
            _ours_fresh()
            t_ours, s_ours = _timed(lambda: calibrate_noise_multiplier(target_epsilon=args.target_epsilon, delta=delta,
                                                                        sample_rate=q, steps=horizon))
            if s_plain != s_ours:
                raise RuntimeError(f"calibrations differ: Opacus {s_plain}, memoised {s_ours}")
            times["cal plain"].append(t_plain)
            times["cal ours"].append(t_ours)
            sigma = s_ours
        if "epsilon" in args.parts:
            s = sigma if sigma is not None else 1.0
            t_plain, e_plain = _timed(lambda: _plain_epsilons(s, q, k, rounds, delta))
            _ours_fresh()
            t_ours, e_ours = _timed(lambda: [epsilon([(s, q, k * r)], delta=delta) for r in range(1, rounds + 1)])
            if e_plain != e_ours:
                raise RuntimeError(f"epsilons differ: Opacus {e_plain}, memoised {e_ours}")
            times["eps plain"].append(t_plain / rounds)
            times["eps ours"].append(t_ours / rounds)
    print(f"q {q}, {k} steps/round, {rounds} rounds, delta {delta:g}; CPU seconds, median of {args.repeats}")
    note = {"better": "lower", "repeats": args.repeats, "ours_is": "fedshield.privacy.accounting (rdp_memo)",
            "baseline_is": "opacus as shipped (PRV accountant)", "sample_rate": q, "steps_per_round": k,
            "rounds": rounds, "delta": delta}
    if times["cal ours"]:
        ours, base = statistics.median(times["cal ours"]), statistics.median(times["cal plain"])
        print(f"calibration to epsilon {args.target_epsilon:g} over {horizon} steps: Opacus {base:.2f}, ours {ours:.2f}")
        rows.append({"name": f"noise calibration, epsilon {args.target_epsilon:g}, q {q}, {horizon} steps", "ours": ours,
                     "baseline": base, "unit": "CPU s", "ratio": ours / base, "detail": {**note, "sigma": sigma}})
    if times["eps ours"]:
        ours, base = statistics.median(times["eps ours"]), statistics.median(times["eps plain"])
        print(f"epsilon of each round's report, mean over {rounds} rounds: Opacus {base:.3f}, ours {ours:.3f}")
        rows.append({"name": f"epsilon per round report, q {q}, {k} steps/round, {rounds} rounds", "ours": ours,
                     "baseline": base, "unit": "CPU s", "ratio": ours / base, "detail": note})
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
