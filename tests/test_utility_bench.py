"""Smoke test of benchmarks/utility.py: two distributed rounds on 3 real sites, its table and its plot."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "utility.py"


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_utility_benchmark_runs_tabulates_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("utility_bench", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(bench.CENTRAL, "epochs", 2 * bench.CENTRAL["q"])  # two rounds
    rows = bench.run([("distributed", 8.0, 3, "iid", 0)])
    assert len(rows) == 1 and 0.0 <= rows[0]["accuracy"] <= 1.0 and math.isfinite(rows[0]["seconds"])
    # The epsilon a row prints recomputes from the mechanism parameters beside it, and lands on the target.
    row = rows[0]
    assert row["steps"] == 2 and row["min_honest_sites"] == 2 and 7.9 <= row["epsilon_spent"] <= 8.0
    assert bench.skellam_accountant.epsilon([row["skellam_entry"]], delta=bench.DELTA) == row["epsilon_spent"]
    rows += [{**row, "method": "central", "min_honest": None, "accuracy": 0.9},
             {**row, "method": "central", "min_honest": None, "accuracy": 0.8, "seed": 1}]
    text = bench.table(rows)
    assert "| sites | partition | epsilon | central | distributed mh 0.5 | seeds |" in text
    assert "| 3 | iid | 8 | 85.0% / 85.0% |" in text  # mean / median of the two central seeds
    # Each method's best setting: here one (q, steps) each; central's two seeds, with their min-max.
    assert "| 3 | iid | 8 | central | " in bench.best_table(rows) and "80.0-90.0% | 2 |" in bench.best_table(rows)
    bench.plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 1000
