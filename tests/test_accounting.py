"""Accounting: composition across rounds, calibration, and agreement with an independent PRV implementation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedshield.errors import BudgetExhaustedError, ConfigError, LedgerError
from fedshield.privacy.accounting import calibrate_noise_multiplier, compact_history, epsilon
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger

DELTA = 1e-5


def test_epsilon_after_r_rounds_equals_one_accountant_fed_all_steps() -> None:
    sigma, q, steps_per_round, rounds = 1.1, 0.25, 8, 10
    ledger = PrivacyLedger(accountant="prv", delta=DELTA, budget=None)
    curve = []
    for r in range(1, rounds + 1):
        ledger = ledger.charge(noise_multiplier=sigma, sample_rate=q, steps=steps_per_round, run_id="t", server_round=r)
        curve.append(ledger.epsilon)
    one = PRVAccountant()
    one.history = [(sigma, q, steps_per_round * rounds)]
    assert ledger.epsilon == pytest.approx(one.get_epsilon(delta=DELTA), rel=1e-9)
    # ... and is far above what a fresh engine per round would report (the bug in Flower's Opacus example).
    fresh = PRVAccountant()
    fresh.history = [(sigma, q, steps_per_round)]
    assert ledger.epsilon > 2 * fresh.get_epsilon(delta=DELTA)
    assert all(b > a for a, b in zip(curve, curve[1:])), "epsilon must grow every round"


def test_epsilon_agrees_with_independent_prv_implementation() -> None:
    prv = pytest.importorskip("prv_accountant", reason="independent accountant: pip install prv-accountant")
    for sigma, q, n in [(1.1, 0.25, 40), (0.8, 0.5, 20), (2.0, 0.1, 300)]:
        mech = prv.PoissonSubsampledGaussianMechanism(noise_multiplier=sigma, sampling_probability=q)
        acc = prv.PRVAccountant(prvs=mech, max_self_compositions=n, eps_error=0.01, delta_error=1e-10)
        low, est, high = acc.compute_epsilon(delta=DELTA, num_self_compositions=n)
        ours = epsilon([(sigma, q, n)], delta=DELTA)
        # Both sides carry a numerical error of at most 0.01 in epsilon.
        assert low - 0.02 <= ours <= high + 0.02, (sigma, q, n, low, ours, high)


def test_prv_is_never_looser_than_rdp() -> None:
    history = [(1.0, 0.25, 40)]
    rdp = RDPAccountant()
    rdp.history = history
    assert epsilon(history, delta=DELTA) <= rdp.get_epsilon(delta=DELTA)
    assert epsilon(history, delta=DELTA, accountant="rdp") == pytest.approx(rdp.get_epsilon(delta=DELTA))


def test_calibration_lands_just_under_target_for_the_whole_horizon() -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=3.0, delta=DELTA, sample_rate=0.25, steps=80)
    spent = epsilon([(sigma, 0.25, 80)], delta=DELTA)
    assert 2.95 <= spent <= 3.0
    # One more round than planned must overspend: the horizon matters.
    assert epsilon([(sigma, 0.25, 88)], delta=DELTA) > 3.0


def test_edge_cases() -> None:
    assert epsilon([], delta=DELTA) == 0.0
    assert math.isinf(epsilon([(0.0, 0.5, 3)], delta=DELTA))
    assert compact_history([(1.0, 0.5, 2), (1.0, 0.5, 3), (2.0, 0.5, 1), (1.0, 0.5, 0)]) == ((1.0, 0.5, 5), (2.0, 0.5, 1))
    with pytest.raises(ConfigError, match="accountant"):
        epsilon([(1.0, 0.5, 1)], delta=DELTA, accountant="gdp")
    with pytest.raises(ConfigError, match="delta"):
        epsilon([(1.0, 0.5, 1)], delta=1.5)


def test_restarted_ledger_continues_the_same_curve(tmp_path) -> None:
    path = tmp_path / LEDGER_FILE
    uninterrupted = PrivacyLedger(accountant="prv", delta=DELTA, budget=None)
    for r in range(1, 7):
        uninterrupted = uninterrupted.charge(noise_multiplier=1.2, sample_rate=0.5, steps=4, run_id="a", server_round=r)
    ledger = PrivacyLedger.open(path, accountant="prv", delta=DELTA, budget=None)
    for r in range(1, 7):
        ledger = PrivacyLedger.open(path, accountant="prv", delta=DELTA, budget=None)  # a new process each round
        ledger = ledger.charge(noise_multiplier=1.2, sample_rate=0.5, steps=4, run_id="a", server_round=r)
        ledger.save(path)
    reloaded = PrivacyLedger.load(path)
    assert reloaded.history == uninterrupted.history
    assert reloaded.epsilon == pytest.approx(uninterrupted.epsilon, rel=1e-12)
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_budget_refusal_is_recorded_and_never_overspends(tmp_path) -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=2.0, delta=DELTA, sample_rate=0.5, steps=6)
    ledger = PrivacyLedger(accountant="prv", delta=DELTA, budget=2.0)
    for r in (1, 2, 3):
        ledger = ledger.charge(noise_multiplier=sigma, sample_rate=0.5, steps=2, run_id="b", server_round=r)
    assert ledger.epsilon <= 2.0
    with pytest.raises(BudgetExhaustedError, match="past this client's budget of 2"):
        ledger.charge(noise_multiplier=sigma, sample_rate=0.5, steps=2, run_id="b", server_round=4)
    refused = ledger.refuse(run_id="b", server_round=4)
    refused.save(tmp_path / "l.json")
    assert PrivacyLedger.load(tmp_path / "l.json").refused == (("b", 4),)


def test_ledger_rejects_corruption_and_mechanism_mismatch(tmp_path) -> None:
    path = tmp_path / LEDGER_FILE
    PrivacyLedger(accountant="prv", delta=DELTA, budget=None).charge(
        noise_multiplier=1.0, sample_rate=0.5, steps=2, run_id="c", server_round=1
    ).save(path)
    with pytest.raises(LedgerError, match="delta"):
        PrivacyLedger.open(path, accountant="prv", delta=1e-6, budget=None)
    path.write_text('{"format": "fedshield-ledger/1", "history": [')
    with pytest.raises(LedgerError, match="not valid JSON"):
        PrivacyLedger.open(path, accountant="prv", delta=DELTA, budget=None)
    path.write_text('{"something": "else"}')
    with pytest.raises(LedgerError, match="not a fedshield privacy ledger"):
        PrivacyLedger.load(path)


def test_budget_can_only_be_tightened_on_reopen(tmp_path) -> None:
    path = tmp_path / LEDGER_FILE
    PrivacyLedger(accountant="prv", delta=DELTA, budget=3.0).save(path)
    assert PrivacyLedger.open(path, accountant="prv", delta=DELTA, budget=10.0).budget == 3.0
    assert PrivacyLedger.open(path, accountant="prv", delta=DELTA, budget=1.0).budget == 1.0


def test_a_rejected_update_still_costs_its_client_the_round(tmp_path: Path) -> None:
    """Validation drops the update, but the client trained (and charged its ledger) to make it: the server's
    account charges the round too, so it can never report less than the client really spent."""
    from fedshield import protocol as P
    from fedshield.config import RoundSettings, RunConfig
    from fedshield.server.report import PrivacyReport
    from fedshield.strategies.validation import REJECTED

    config = RunConfig(num_clients=2, num_rounds=2, out=tmp_path)
    settings = RoundSettings(
        run_id="r", server_round=1, num_rounds=2, task="digits", partition="iid", seed=0, local_epochs=1, lr=1.0,
        sample_rate=0.5, dp=True, noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=8.0, delta=1e-5,
        accountant="prv", grad_sample_mode="ghost",
    )
    report = PrivacyReport(config, 1.0)
    report.record_round(settings, [
        P.ClientReply(1, {P.PARTITION_ID: 0.0}),
        P.ClientReply(2, {P.PARTITION_ID: 1.0}, error=f"{REJECTED}: update norm 1e9 exceeds max-update-norm 5"),
    ])
    clients = report.to_json()["clients"]
    honest, rejected = clients["client-0"], clients["client-1"]
    assert rejected["history"] == honest["history"] == [[1.0, 0.5, settings.steps_per_round]]
    assert rejected["epsilon"] == pytest.approx(honest["epsilon"]) and rejected["epsilon"] > 0
    assert rejected["rounds_trained"] == 0 and [f["round"] for f in rejected["failures"]] == [1]
