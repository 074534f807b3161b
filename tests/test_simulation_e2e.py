"""End to end through Flower's real simulation engine (Ray) with real Opacus: the run directory, the accuracy band
that proves DP is on (and not silently off), and privacy figures that recompute from what is written beside them."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedshield.config import RunConfig
from fedshield.privacy.accounting import epsilon
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedshield.server.report import recompute_epsilon
from fedshield.tasks import get_task

import _sim_batch as sim_batch

pytestmark = [pytest.mark.usefixtures("no_leftover_processes"), sim_batch.TIMEOUT]


#: How far below the little-noise control the epsilon-8 run must stay. Measured 2026-12-03: 75.2% vs 78.8% after 2
#: rounds (both runs are deterministic for their seed: the same figures in 3 runs under different load).
GAP = 0.015
BASE = dict(num_clients=3, num_rounds=2, local_epochs=4, secagg=False)


def _budget_sigma() -> float:
    """Noise fixed for 1 round of an epsilon-2 budget: round 2 would overspend it."""
    from fedshield.privacy.accounting import calibrate_noise_multiplier

    probe = RunConfig(num_clients=3, num_rounds=1, local_epochs=4)
    return calibrate_noise_multiplier(target_epsilon=2.0, delta=probe.delta, sample_rate=probe.sample_rate,
                                      steps=probe.steps_per_round)


def _config(root: Path, name: str) -> RunConfig:
    """The runs of this module differ only in their configs, so they run in the shared simulation of the other
    3-client tests (``_sim_batch``: one Ray start, shared virtual clients, separate run directories, strategies and
    client ledgers). Built when the batch starts (the budget run's calibration takes seconds: not at collection)."""
    variants: dict[str, dict] = {
        "dp": dict(epsilon=8.0),
        # The control that bounds the DP run's accuracy from above: the same DP-SGD (Poisson sampling, clipping)
        # with little noise (sigma 0.3: epsilon ~100, finite, so the server accepts the updates). Plain SGD is no
        # control: at the DP learning rate, unclipped, it diverges in round 2.
        "little-noise": dict(epsilon=None, noise_multiplier=0.3),
        "noise": dict(epsilon=None, noise_multiplier=1000.0),
        "no-fed-eval": dict(num_rounds=1, local_epochs=1, fraction_evaluate=0.0),
        "budget": dict(num_rounds=3, epsilon=2.0),
        "q8": dict(epsilon=8.0, quantize=8),
    }
    if name == "budget":
        variants[name]["noise_multiplier"] = _budget_sigma()
    return RunConfig(**{**BASE, **variants[name], "out": root / f"e2e-{name}"})


for _name in ("dp", "little-noise", "noise", "no-fed-eval", "budget", "q8"):
    sim_batch.register(f"e2e/{_name}", lambda root, n=_name: _config(root, n), clients=3)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, RunConfig]:
    return sim_batch.results(tmp_path_factory, clients=3).view("e2e/")


def _rows(config: RunConfig) -> list[dict]:
    return [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]


def test_dp_run_learns_writes_run_dir_and_privacy_recomputes(runs: Mapping[str, RunConfig]) -> None:
    config = runs["dp"]
    out = config.out
    rows = _rows(config)
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


def test_absurd_noise_keeps_accuracy_near_chance(runs: Mapping[str, RunConfig]) -> None:
    """If DP were silently off, this run would learn as well as the one above."""
    config = runs["noise"]
    rows = _rows(config)
    assert rows[-1]["accuracy"] < 0.3, rows[-1]
    privacy = json.loads((config.out / "privacy.json").read_text())
    assert privacy["guarantee"]["epsilon"] < 0.05


def test_the_epsilon_8_run_stays_below_the_same_run_with_little_noise(runs: Mapping[str, RunConfig]) -> None:
    """An upper bound on the epsilon-8 run's accuracy: the identical run (same seed, data, clients, rounds, clipping)
    with noise multiplier 0.3. If the noise were silently off or smaller than accounted, the two would learn alike."""
    dp, control = _rows(runs["dp"])[-1], _rows(runs["little-noise"])[-1]
    assert control["clients_trained"] == 3, control
    assert dp["accuracy"] < control["accuracy"] - GAP, (dp, control)


def test_fraction_evaluate_zero_leaves_evaluation_to_the_server(runs: Mapping[str, RunConfig]) -> None:
    """With --fraction-evaluate 0 no client is asked to evaluate; the server's own test set still scores the model."""
    (row,) = _rows(runs["no-fed-eval"])
    assert row["clients_trained"] == 3 and row["clients_evaluated"] == 0
    assert row["federated_accuracy"] is None and row["accuracy"] is not None


def test_budget_exhausted_clients_refuse_and_are_reported(runs: Mapping[str, RunConfig]) -> None:
    """Noise fixed for 1 round of budget: round 2 would overspend, so every client refuses and says so."""
    config = runs["budget"]
    rows = _rows(config)
    assert [r["clients_trained"] for r in rows] == [3, 0, 0]
    assert [r["clients_refused"] for r in rows] == [0, 3, 3]
    privacy = json.loads((config.out / "privacy.json").read_text())
    for c in privacy["clients"].values():
        assert c["stopped_on_budget"] is True and c["stopped_round"] == 2
        assert c["epsilon"] <= 2.0
    assert math.isclose(rows[1]["accuracy"], rows[0]["accuracy"])  # nobody trained: the model did not move


def test_quantized_updates_cut_bytes_and_still_learn(runs: Mapping[str, RunConfig]) -> None:
    rows = _rows(runs["q8"])
    model_bytes = sum(v.numel() * 4 for v in get_task("digits").new_model(0).state_dict().values())
    assert all(r["bytes_up_per_client"] <= 0.3 * model_bytes for r in rows), rows
    assert rows[-1]["accuracy"] > 0.5, rows[-1]
