"""End to end through Flower's real simulation engine (Ray) with real Opacus: the run directory, the accuracy band
that proves DP is on (and not silently off), and privacy figures that recompute from what is written beside them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedshield.config import RunConfig
from fedshield.privacy.accounting import epsilon
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedshield.server.report import recompute_epsilon
from fedshield.simulation.run import simulate
from fedshield.tasks import get_task

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def _run(tmp_path: Path, name: str, **overrides) -> tuple[RunConfig, list]:  # type: ignore[no-untyped-def]
    base = dict(num_clients=3, num_rounds=2, local_epochs=4, secagg=False, out=tmp_path / name)
    config = RunConfig(**{**base, **overrides})
    rounds: list = []
    simulate(config, on_round=rounds.append)
    return config, rounds


def test_dp_run_learns_writes_run_dir_and_privacy_recomputes(tmp_path: Path) -> None:
    config, rounds = _run(tmp_path, "dp", epsilon=8.0)
    out = config.out
    assert [r.server_round for r in rounds] == [1, 2]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_trained"] == 3 and r["clients_evaluated"] == 3 and r["clients_failed"] == 0 for r in rows)
    # Band: clearly above chance (10%) with DP at epsilon 8 after 2 short rounds ...
    assert rows[-1]["accuracy"] > 0.5, rows[-1]
    assert rows[-1]["federated_accuracy"] > 0.4, rows[-1]

    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["dp"] is True and privacy["level"] == "record"
    mech = privacy["mechanism"]
    assert mech["accountant"] == "prv" and mech["delta"] == config.delta
    assert len(privacy["clients"]) == 3
    for name, c in privacy["clients"].items():
        assert c["rounds_trained"] == 2 and c["steps"] == 2 * config.steps_per_round
        # Every epsilon recomputes from the parameters written beside it ...
        assert c["epsilon"] == pytest.approx(recompute_epsilon(c), rel=1e-9)
        assert c["epsilon"] == pytest.approx(
            epsilon([(mech["noise_multiplier"], mech["sample_rate"], c["steps"])], delta=c["delta"]), rel=1e-9
        )
        # ... agrees with the client's own ledger on disk, and lands on the planned budget.
        ledger = PrivacyLedger.load(out / "clients" / f"client-{c['partition_id']:04d}" / LEDGER_FILE)
        assert ledger.epsilon == pytest.approx(c["epsilon"], rel=1e-9)
        assert 7.9 <= c["epsilon"] <= 8.0
    assert privacy["guarantee"]["epsilon"] == pytest.approx(max(c["epsilon"] for c in privacy["clients"].values()))

    weights = load_file(out / "model.safetensors")
    assert set(weights) == set(get_task("digits").new_model(0).state_dict())
    for png in ("accuracy.png", "epsilon.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_absurd_noise_keeps_accuracy_near_chance(tmp_path: Path) -> None:
    """If DP were silently off, this run would learn as well as the one above."""
    config, _ = _run(tmp_path, "noise", epsilon=None, noise_multiplier=1000.0)
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["accuracy"] < 0.3, rows[-1]
    privacy = json.loads((config.out / "privacy.json").read_text())
    assert privacy["guarantee"]["epsilon"] < 0.05


def test_fraction_evaluate_zero_leaves_evaluation_to_the_server(tmp_path: Path) -> None:
    """With --fraction-evaluate 0 no client is asked to evaluate; the server's own test set still scores the model."""
    config, _ = _run(tmp_path, "no-fed-eval", num_rounds=1, local_epochs=1, fraction_evaluate=0.0)
    (row,) = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert row["clients_trained"] == 3 and row["clients_evaluated"] == 0
    assert row["federated_accuracy"] is None and row["accuracy"] is not None


def test_budget_exhausted_clients_refuse_and_are_reported(tmp_path: Path) -> None:
    """Noise fixed for 1 round of budget: round 2 would overspend, so every client refuses and says so."""
    from fedshield.privacy.accounting import calibrate_noise_multiplier

    probe = RunConfig(num_clients=3, num_rounds=1, local_epochs=4)
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=probe.delta, sample_rate=probe.sample_rate,
                                       steps=probe.steps_per_round)
    config, rounds = _run(tmp_path, "budget", num_rounds=3, epsilon=2.0, noise_multiplier=sigma)
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_trained"] for r in rows] == [3, 0, 0]
    assert [r["clients_refused"] for r in rows] == [0, 3, 3]
    privacy = json.loads((config.out / "privacy.json").read_text())
    for c in privacy["clients"].values():
        assert c["stopped_on_budget"] is True and c["stopped_round"] == 2
        assert c["epsilon"] <= 2.0
    assert math.isclose(rows[1]["accuracy"], rows[0]["accuracy"])  # nobody trained: the model did not move


def test_quantized_updates_cut_bytes_and_still_learn(tmp_path: Path) -> None:
    config, _ = _run(tmp_path, "q8", epsilon=8.0, quantize=8)
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    model_bytes = sum(v.numel() * 4 for v in get_task("digits").new_model(0).state_dict().values())
    assert all(r["bytes_up_per_client"] <= 0.3 * model_bytes for r in rows), rows
    assert rows[-1]["accuracy"] > 0.5, rows[-1]
