"""What ``simulate`` and ``server`` print about a run: one line per round, and the privacy summary at the end.

Shared so that a deployed run reads exactly like a simulated one; both are built from the same rows the ServerApp
writes to ``metrics.jsonl`` and ``privacy.json``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ..server.records import RoundRecord, RunSummary

__all__ = ["print_summary", "round_line"]


def round_line(record: RoundRecord) -> str:
    """``round   3/20  acc  91.2%  loss 0.301  trained 5/5  eps 2.10..2.10  6.3s`` (rich markup)."""
    row = record.row
    acc = "n/a" if row.get("accuracy") is None else f"{100 * row['accuracy']:.1f}%"
    loss = "n/a" if row.get("loss") is None else f"{row['loss']:.3f}"
    eps = [e for e in record.client_epsilons.values() if e is not None]
    eps_text = f"eps {min(eps):.2f}..{max(eps):.2f}" if eps else "eps n/a"
    extra = ""
    if row.get("clients_refused"):
        extra += f"  [yellow]{row['clients_refused']} refused (budget)[/]"
    if row.get("clients_rejected"):
        extra += f"  [red]{row['clients_rejected']} rejected (invalid update)[/]"
    if row.get("clients_failed"):
        extra += f"  [red]{row['clients_failed']} failed[/]"
    return (
        f"round {record.server_round:>3}/{record.num_rounds}  acc {acc:>6}  loss {loss}  "
        f"trained {row.get('clients_trained', 0)}/{row.get('clients_sampled', 0)}  {eps_text}  "
        f"{row.get('round_time_s', 0.0):.1f}s{extra}"
    )


def print_summary(summary: RunSummary, console: Console) -> None:
    """Per-client privacy table, the run's guarantee, final accuracy and where the files are."""
    privacy = summary.privacy
    if not privacy:
        return
    table = Table(title="record-level privacy spent per client")
    for col in ("client", "epsilon", "rounds", "steps", "stopped on budget"):
        table.add_column(col)
    for name, c in privacy["clients"].items():
        eps = "inf (no DP)" if c["epsilon"] is None else f"{c['epsilon']:.3f}"
        stopped = f"round {c['stopped_round']}" if c["stopped_on_budget"] else "no"
        table.add_row(name, eps, str(c["rounds_trained"]), str(c["steps"]), stopped)
    console.print(table)
    g = privacy["guarantee"]
    mech = privacy["mechanism"]
    if summary.config.dp and g["epsilon"] is not None and math.isfinite(g["epsilon"]):
        console.print(
            f"guarantee: ({g['epsilon']:.3f}, {g['delta']:g})-DP per record, add/remove adjacency (max over clients); "
            f"sigma={mech['noise_multiplier']:.4f} q={mech['sample_rate']:g} C={mech['max_grad_norm']:g} "
            f"accountant={mech['accountant']}"
        )
    else:
        console.print(f"guarantee: {g['statement']}")
    last = summary.rounds[-1] if summary.rounds else {}
    if last.get("accuracy") is not None:
        console.print(f"final server test accuracy: {100 * last['accuracy']:.1f}%")
    randomness = summary.privacy.get("randomness", {})
    if randomness.get("simulated"):
        console.print(f"[bold yellow]NOTE[/]: {randomness['statement']}")
    console.print(f"run directory: {summary.config.out}")
