"""``benchmarks/pfl_peer.py`` (fedshield against Apple's pfl on issue 13's job) without pfl, which CI never installs:
the job it exports from fedshield's own code is fedshield's split and initial model, the pfl side's copy of
DigitsCNN is checked against it (and a drifted copy fails), pfl's user sampler draws like Flower's FedAvg, and the
table and ``--json`` rows come out of canned measurements. fedshield's side live (``--quick --only fedshield``, a
Ray simulation of a minute or more) runs only under ``-m slow``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pfl-job")
    return out, load_benchmark("pfl_peer").export_job(100, out)


def test_the_exported_job_is_fedshields_split_and_initial_model(job: tuple[Path, dict]) -> None:
    from fedshield.client.site import bundled_split
    from fedshield.tasks import get_task

    out, meta = job
    assert (meta["num_clients"], meta["cohort"], meta["batch_size"], meta["task"]) == (100, 10, 6, "digits")
    data = np.load(out / "job.npz")
    split = bundled_split("digits", "iid", 100, 0)
    offsets = data["offsets"]
    for cid in (0, 41, 99):
        train = split.clients[cid][0]
        assert np.array_equal(data["train_x"][offsets[cid]:offsets[cid + 1]], train.x)
        assert np.array_equal(data["train_y"][offsets[cid]:offsets[cid + 1]], train.y)
        assert math.ceil(len(train) * 0.5) == meta["batch_size"]
    assert offsets[-1] == sum(len(t) for t, _ in split.clients) == len(data["train_y"])
    assert np.array_equal(data["test_y"], split.server_test.y)
    model = get_task("digits").new_model(0)
    for name, value in model.state_dict().items():
        assert np.array_equal(data[f"init/{name}"], value.numpy()), name
    assert meta["num_params"] == sum(p.numel() for p in model.parameters()) == 6090


def test_the_pfl_sides_model_copy_is_checked_against_fedshields(job: tuple[Path, dict]) -> None:
    side = load_benchmark("pfl_peer_side")  # imports numpy and torch only: pfl is imported inside its functions
    out, meta = job
    data = dict(np.load(out / "job.npz"))
    model = side.checked_model(data, meta)
    from fedshield.tasks import get_task

    ours = get_task("digits").new_model(0)
    x = torch.from_numpy(data["test_x"][:32])
    with torch.no_grad():
        assert torch.equal(model(x), ours(x))
    drifted = {**data, "init_logits": data["init_logits"] + 1e-3}  # as if either copy's forward changed
    with pytest.raises(SystemExit, match="logits differ"):
        side.checked_model(drifted, meta)
    with pytest.raises(SystemExit, match="parameters"):
        side.checked_model(data, {**meta, "num_params": meta["num_params"] + 1})


def test_pfl_users_are_drawn_like_flowers_fedavg() -> None:
    """10 distinct users per round (Flower samples without replacement; pfl's 'random' sampler draws with)."""
    sampler = load_benchmark("pfl_peer_side").CohortSampler(100, 10, seed=0)
    rounds = [[sampler() for _ in range(10)] for _ in range(50)]
    assert all(len(set(r)) == 10 and all(0 <= u < 100 for u in r) for r in rounds)
    assert len({u for r in rounds for u in r}) > 90  # every round draws afresh from all users


def test_table_and_rows_from_canned_measurements() -> None:
    bench = load_benchmark("pfl_peer")

    def run(s_per_round: float, accuracy: float, epsilon: float | None) -> dict:
        return {"s_per_round": s_per_round, "client_rounds_per_s": 10 / s_per_round, "wall_s": 30.0,
                "first_round_s": 20.0, "accuracy": accuracy, "rounds": 20, "trained": 200, "epsilon": epsilon}

    results = {(100, "nodp", "fedshield"): [run(0.2, 0.84, None)], (100, "nodp", "pfl"): [run(0.05, 0.86, None)],
               (100, "central", "fedshield"): [run(0.4, 0.85, 40.0)], (100, "central", "pfl"): [run(0.1, 0.85, 9.0)],
               (1000, "nodp", "fedshield"): [run(2.0, 0.9, None)]}  # pfl's side missing: table only, no rows
    rows = bench.json_rows(results)
    assert len(rows) == 2 * len(bench.KEYS)
    for row in rows:
        assert set(row) == {"name", "ours", "baseline", "unit", "ratio", "detail"}
        assert row["ratio"] == pytest.approx(row["ours"] / row["baseline"])
        assert row["detail"]["better"] in ("higher", "lower")
    by_name = {r["name"]: r for r in rows}
    speed = by_name["pfl peer client_rounds_per_s (nodp), 100 clients, fedshield vs pfl 0.6.0"]
    assert speed["ratio"] == pytest.approx(0.25)
    assert by_name["pfl peer accuracy (central), 100 clients, fedshield vs pfl 0.6.0"]["detail"]["pfl_epsilon"] == 9.0
    lines = bench.table(results).splitlines()
    assert lines[2].startswith("| 100 | central client-level DP (C 1, z 0.3) | fedshield | 0.400 / 0.100 | 25.0 / 100.0 (**0.25x**)")
    assert lines[3].startswith("| 100 | no DP | fedshield | 0.200 / 0.050 | 50.0 / 200.0 (**0.25x**)")
    assert lines[4].startswith("| 1000 | no DP | fedshield | 2.000 / - | 5.0 / - |")


def test_a_missing_pfl_virtualenv_is_one_clear_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pfl_peer.py"), "--quick", "--pfl-python",
                           str(tmp_path / "nope" / "python")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"no pfl virtualenv at {tmp_path / 'nope' / 'python'}: run python benchmarks/pfl_peer.py --setup first "
        "(or --only fedshield)"]


@pytest.mark.slow
def test_fedshield_side_live(no_leftover_processes: None) -> None:
    """The real ``fedshield simulate`` command the benchmark builds: it runs and is read back (a minute or more)."""
    tmp = Path(tempfile.mkdtemp(prefix="fspt-", dir="/tmp"))
    try:
        env = {**os.environ, "TMPDIR": str(tmp), "FLWR_TELEMETRY_ENABLED": "0"}
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pfl_peer.py"), "--quick", "--only",
                               "fedshield"], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        line = next(x for x in proc.stdout.splitlines() if x.startswith("100 nodp fedshield:local: "))
        result = json.loads(line.split(": ", 1)[1])
        assert result["rounds"] == 2 and result["trained"] == 20 and 0 < result["accuracy"] <= 1
        assert "| 100 | no DP | " in proc.stdout
        assert not list(tmp.iterdir()), sorted(tmp.iterdir())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
