"""The run directory's figures, read back from what was drawn (matplotlib Axes), not from image bytes."""

from __future__ import annotations

from pathlib import Path

from fedshield.config import RunConfig
from fedshield.server.plots import BUDGET_LABEL, draw_figure
from fedshield.server.run_writer import RunWriter

ROWS = [{"round": r, "accuracy": 0.5 + r / 100, "epsilon_max": 0.7 * r} for r in range(1, 11)]


def _round_ticks(fig) -> list[float]:  # type: ignore[no-untyped-def]
    ax = fig.axes[0]
    lo, hi = ax.get_xlim()
    return [t for t in ax.get_xticks() if lo <= t <= hi]


def test_rounds_tick_only_at_whole_rounds() -> None:
    for rows in (ROWS, ROWS[:1], ROWS[:3], ROWS * 0):
        fig = draw_figure(rows, "accuracy", "server test accuracy")
        ticks = _round_ticks(fig)
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_the_epsilon_figure_draws_the_budget_as_a_labelled_horizontal_line() -> None:
    fig = draw_figure(ROWS, "epsilon_max", "epsilon", budget=8.0)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    budget = lines[f"{BUDGET_LABEL} (8)"]
    assert set(budget.get_ydata()) == {8.0}  # horizontal, at the budget
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["epsilon", f"{BUDGET_LABEL} (8)"]
    spent = lines["epsilon"]
    assert list(spent.get_xdata()) == list(range(1, 11)) and max(spent.get_ydata()) == 7.0
    assert BUDGET_LABEL not in " ".join(draw_figure(ROWS, "epsilon_max", "epsilon").axes[0].get_legend_handles_labels()[1])


def test_the_run_writer_draws_the_runs_budget_and_none_without_dp(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path / "run")
    writer.prepare(RunConfig(epsilon=3.0))
    assert writer.epsilon_budget == 3.0
    for row in ROWS[:2]:
        writer.add_round(row)
    writer.write_plots()
    assert {p.name for p in (tmp_path / "run").iterdir()} >= {"accuracy.png", "epsilon.png"}
    assert (tmp_path / "run" / "epsilon.png").read_bytes().startswith(b"\x89PNG")
    off = RunWriter(tmp_path / "off")
    off.prepare(RunConfig(dp=False))
    assert off.epsilon_budget is None
