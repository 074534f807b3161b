"""What the server's per-round bookkeeping costs: the real RunReporter, phase by phase, without Flower or Ray.

Issue 13 asks for per-round bookkeeping that costs (close to) nothing. This drives fedshield's own
:class:`~fedshield.server.reporter.RunReporter` (the object a real run's ServerApp calls after every round: privacy
report, ``metrics.jsonl``, checkpoint, model, ``privacy.json``) for the rounds of issue 13's job: 100 clients, 10
sampled per round (fixed seed), DigitsCNN's weights, 20 rounds, and times each phase of every round:

* ``central-client-dp``: ``--no-dp --client-dp central --client-noise-multiplier 0.3 --client-clip-norm 1``
  (the pfl_peer benchmark's DP row): the client-level epsilon over the whole history, every round.
* ``record-dp``: record-level DP-SGD at the defaults (epsilon 8, q 0.5, 2 local epochs): one history per client.

The replies and releases are what the strategy layers would hand over (``RoundOutcomes``); nothing else is faked.
The phases are measured by wrapping the functions the reporter calls (``accounting`` = every epsilon computation,
the PRV accountant's included; ``privacy_json`` = building the report dict minus its accounting), so their sum is
a little under ``total`` (the row, bookkeeping in between).

Between two reports the script sleeps ``--round-gap`` seconds: the time a round's clients train while the server
thread only waits (0.24-0.36 s a round for this job without DP in the pfl_peer benchmark), and ``--first-round``
seconds before round 1 (the simulation engine's start); the accounting of later rounds may run then (:mod:`fedshield.server.accounting_ahead`). ``total_s`` is the wall time of one
``record_round`` (what the round loop waits for), ``cpu_s`` the server thread's own CPU time in it.

Usage: ``python benchmarks/bookkeeping.py [--settings central-client-dp record-dp] [--rounds 20] [--round-gap 0.3]
[--json FILE]``. Prints one line per round and the median of rounds 2..R per phase. Run it in a fresh process: the
accountant's cache lives for the process. To time older code, copy this file into that checkout's benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedshield import protocol as P  # noqa: E402
from fedshield.config import RunConfig  # noqa: E402
from fedshield.protocol import ClientReply  # noqa: E402
from fedshield.server import report as report_mod  # noqa: E402
from fedshield.server.plan import plan_run  # noqa: E402
from fedshield.server.reporter import RunReporter  # noqa: E402
from fedshield.strategies.outcomes import ReleaseEvent, RoundOutcomes  # noqa: E402
from fedshield.tasks import get_task  # noqa: E402

SETTINGS: dict[str, dict[str, Any]] = {
    "central-client-dp": {"dp": False, "client_dp": "central", "client_noise_multiplier": 0.3,
                          "client_clip_norm": 1.0},
    "record-dp": {"dp": True},
}
Phases = dict[str, float]


def _timed(phases: Phases, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[name] += time.perf_counter() - start
    return wrapper


def _instrument(reporter: RunReporter, phases: Phases) -> None:
    """Wrap what record_round calls. Accounting is timed where the report calls the accountant."""
    for name in ("client_level_epsilon", "history_epsilon"):
        if hasattr(report_mod, name):
            setattr(report_mod, name, _timed(phases, "accounting", getattr(report_mod, name)))
    w = reporter.writer
    # Since stop 25 these encode a file and queue it; the background writer writes it while the next round runs,
    # and "files_wait" is the time a round waited for the previous round's files (RunWriter.round_files).
    w.write_checkpoint = _timed(phases, "checkpoint", w.write_checkpoint)  # type: ignore[method-assign]
    w.flush = _timed(phases, "files_wait", w.flush)  # type: ignore[method-assign]
    w.write_metrics = _timed(phases, "metrics_jsonl", w.write_metrics)  # type: ignore[method-assign]
    w.write_model = _timed(phases, "model", w.write_model)  # type: ignore[method-assign]
    w.write_privacy = _timed(phases, "privacy_json_write", w.write_privacy)  # type: ignore[method-assign]


def run(setting: str, rounds: int, clients: int, per_round: int, gap: float, first: float) -> list[dict[str, Any]]:
    model = get_task("digits").new_model(0)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="bookkeeping-") as tmp:
        config = RunConfig(num_clients=clients, num_rounds=rounds, secagg=False, fraction_train=per_round / clients,
                           out=Path(tmp) / "run", **SETTINGS[setting])
        reporter = RunReporter(plan_run(config), {})
        phases: Phases = defaultdict(float)
        _instrument(reporter, phases)
        out = []
        reporter.start_round()
        for r in range(1, rounds + 1):
            time.sleep(first if r == 1 else gap)  # the clients train (round 1: and the engine starts)
            picked = sorted(rng.sample(range(clients), per_round))
            outcomes = RoundOutcomes(release=ReleaseEvent(r, 0.3, 1.0, float(per_round), float(per_round))
                                     if config.client_dp != "off" else None)
            outcomes.settle([ClientReply(1000 + p, {P.PARTITION_ID: p}) for p in picked])
            phases.clear()
            start, cpu = time.perf_counter(), time.thread_time()
            reporter.record_round(r, state, {"accuracy": 0.5, "loss": 1.0}, outcomes)
            total, cpu = time.perf_counter() - start, time.thread_time() - cpu
            out.append({"setting": setting, "round": r, "total_s": total, "cpu_s": cpu, **dict(phases)})
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out[-1].items()}), flush=True)
        reporter.finish()
    return out


def summary(rows: list[dict[str, Any]]) -> str:
    lines = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        mine = [r for r in rows if r["setting"] == setting and r["round"] >= 2]
        keys = [k for k in mine[0] if k.endswith("_s") or k not in ("setting", "round")]
        med = {k: statistics.median(r.get(k, 0.0) for r in mine) for k in keys}
        last = mine[-1]
        lines.append(f"{setting}: median over rounds 2..{last['round']} (ms): "
                     + ", ".join(f"{k} {v * 1000:.1f}" for k, v in med.items())
                     + f"; last round total {last['total_s'] * 1000:.2f} ms, accounting "
                     f"{last.get('accounting', 0.0) * 1000:.2f} ms")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--round-gap", type=float, default=0.3, help="seconds the clients train between two reports")
    ap.add_argument("--first-round", type=float, default=10.0,
                    help="seconds of round 1 (Ray's start and imports: ~10-19 s on a quiet 2-core machine)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = [row for s in args.settings
            for row in run(s, args.rounds, args.clients, args.per_round, args.round_gap, args.first_round)]
    print(summary(rows))
    print(f"load average {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
