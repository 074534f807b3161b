"""The run directory's figures: server test accuracy and record-level epsilon per round.

Drawing is separate from saving so a test can read back what was drawn (the Axes' ticks and lines) instead of
comparing image bytes. Rounds are whole numbers, so the round axis ticks only at integers (matplotlib's default
locator ticked a 10-round run at 2.5, 7.5); the epsilon figure draws the run's budget as a labelled horizontal
line, so how close the spend came to it is visible without reading ``config.json``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["BUDGET_LABEL", "FIGURES", "draw_figure", "render_png"]

#: File name, metrics.jsonl key, y-axis label.
FIGURES = (
    ("accuracy.png", "accuracy", "server test accuracy"),
    ("epsilon.png", "epsilon_max", "epsilon (max over clients)"),
)
BUDGET_LABEL = "epsilon budget"


def draw_figure(rows: Sequence[Mapping[str, Any]], key: str, label: str, *, budget: float | None = None) -> Figure:
    """One metric per round; with ``budget``, a horizontal line at it. Rows without the metric are skipped."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5, 3.2), dpi=110)  # not pyplot: no global figure registry, safe in a server thread
    ax: Axes = fig.subplots()
    points = [(r["round"], r[key]) for r in rows if r.get(key) is not None]
    ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    if budget is not None:
        ax.axhline(budget, color="tab:red", linestyle="--", label=f"{BUDGET_LABEL} ({budget:g})")
        ax.legend(loc="lower right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("round")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def render_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
