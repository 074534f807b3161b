"""Checkpoint and resume: SIGKILL the real ``fedshield simulate`` process (and its Ray processes) after round 2 of
4, resume, and get the model an uninterrupted run with the same seed gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import _sim_batch as sim_batch
from _processes import alive
from safetensors.numpy import load_file

from fedshield.config import RunConfig
from fedshield.deploy.process import live_descendants
from fedshield.errors import ConfigError
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedshield.server.checkpoint import CHECKPOINT_FILE, load_checkpoint
from fedshield.simulation.run import load_resume, simulate

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

# No SecAgg+ here: Flower's client mod quantizes with stochastic rounding from numpy's global, unseeded RNG,
# so two SecAgg+ runs differ by quantization noise (~4e-6 per value); everything else is seeded.
# A fixed noise multiplier under a wide budget: the kill may land after the sites charged the round in progress,
# which resume charges again (ledgers never under-count). Calibrated to epsilon 8, that double charge made round 4
# overspend and be refused, so the model could not equal the reference (seen once rounds got fast enough for the
# kill to land there); with room in the budget every round trains in both runs.
SETTINGS = dict(num_clients=3, num_rounds=4, local_epochs=1, secagg=False, seed=3, noise_multiplier=1.0, epsilon=50.0)
FLAGS = ["--clients", "3", "--rounds", "4", "--local-epochs", "1", "--no-secagg", "--seed", "3",
         "--noise-multiplier", "1.0", "--epsilon", "50"]
# The uninterrupted reference run: in the shared simulation of the other 3-client tests (one Ray start fewer).
sim_batch.register("resume/reference", lambda root: RunConfig(**SETTINGS, out=root / "resume-reference"), clients=3)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> sim_batch.Batch:
    return sim_batch.results(tmp_path_factory, clients=3)


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _kill_tree(proc: subprocess.Popen) -> None:
    pids = [proc.pid, *live_descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(alive(p) for p in pids[1:]):
        time.sleep(0.2)



@sim_batch.TIMEOUT
def test_killed_server_resumes_to_the_uninterrupted_model(batch: sim_batch.Batch, tmp_path: Path) -> None:
    reference = batch.config("resume/reference").out

    run = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedshield", "simulate", *FLAGS, "--out", str(run)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while len(_rows(run)) < 2:
            assert proc.poll() is None, "simulate exited before round 2"
            assert time.monotonic() < deadline, "round 2 never completed"
            time.sleep(0.2)
    finally:
        _kill_tree(proc)
    killed_at = load_checkpoint(run).server_round
    assert 2 <= killed_at < 4, f"the kill must land before the end (checkpoint at {killed_at})"

    config, ckpt = load_resume(run)
    assert ckpt.server_round == killed_at and config.num_rounds == 4
    simulate(config, resume=ckpt)

    rows = _rows(run)
    assert [r["round"] for r in rows] == [1, 2, 3, 4], "no completed round lost or repeated"
    ours, theirs = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        # Equal up to float summation order in aggregation (replies arrive in any order).
        np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-5, err_msg=key)
    assert load_checkpoint(run).server_round == 4

    # Ledgers never under-count: a round interrupted after a client charged it is charged again on resume.
    for ledger_path in sorted((run / "clients").glob(f"*/{LEDGER_FILE}")):
        resumed = PrivacyLedger.load(ledger_path)
        reference_ledger = PrivacyLedger.load(reference / "clients" / ledger_path.parent.name / LEDGER_FILE)
        assert resumed.epsilon >= reference_ledger.epsilon - 1e-9
    privacy = json.loads((run / "privacy.json").read_text())
    assert all(c["rounds_trained"] == 4 for c in privacy["clients"].values())
    assert all(r["clients_trained"] == 3 for r in rows), rows


def test_resume_refuses_what_it_cannot_continue(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        load_resume(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(RunConfig(out=tmp_path).to_flat_dict()))
    with pytest.raises(ConfigError, match=f"no {CHECKPOINT_FILE}"):
        load_resume(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        load_resume(tmp_path)
