"""privacy.json never reports less than a site's own ledger for the run: every DP train reply that is not a
refusal sent before charging is charged (an aborted SecAgg+ round, a late reply, a rejected update)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedshield import protocol as P
from fedshield.config import RoundSettings, RunConfig
from fedshield.privacy.ledger import LEDGER_FILE, charge_ledger
from fedshield.server.report import PrivacyReport, recompute_epsilon

ROUNDS = 4


def _settings(server_round: int) -> RoundSettings:
    return RoundSettings(
        run_id="r", server_round=server_round, num_rounds=ROUNDS, task="digits", partition="iid", seed=0,
        local_epochs=1, lr=1.0, sample_rate=0.5, dp=True, noise_multiplier=1.0, max_grad_norm=1.0,
        target_epsilon=0.0, delta=1e-5, accountant="prv", grad_sample_mode="ghost",
    )


@pytest.mark.parametrize("failure", [
    "round aborted: 1 of 3 nodes sent masked vectors, fewer than the threshold 2",  # SecAgg+ abort
    "no reply before the round timed out",  # late reply
    "fedshield:rejected: update norm 1e9 exceeds max-update-norm 5",
])
def test_a_failed_reply_after_the_site_charged_is_charged_in_privacy_json(tmp_path: Path, failure: str) -> None:
    report = PrivacyReport(RunConfig(num_clients=3, num_rounds=ROUNDS, out=tmp_path), 1.0)
    path = tmp_path / LEDGER_FILE
    for rnd in range(1, ROUNDS + 1):
        settings = _settings(rnd)
        # The site charges before it trains (as client.trainer does) ...
        ledger = charge_ledger(path, accountant="prv", delta=1e-5, budget=None, noise_multiplier=1.0,
                               sample_rate=0.5, steps=settings.steps_per_round, run_id="r", server_round=rnd)
        # ... and its last round ends as an error on the server's side (the masked vector arrived, the round died).
        last = rnd == ROUNDS
        metrics = {P.NUM_EXAMPLES: 1.0, P.EPSILON: ledger.epsilon} if not last or "aborted" in failure else {}
        report.record_round(settings, [P.ClientReply(1, metrics, error=failure if last else None)])
    (entry,) = report.to_json()["clients"].values()
    assert entry["epsilon"] >= ledger.epsilon - 1e-9, (entry["epsilon"], ledger.epsilon)
    assert recompute_epsilon(entry) == pytest.approx(ledger.epsilon, rel=1e-9)  # from privacy.json alone
    assert entry["charged_unconfirmed"] == [ROUNDS] and entry["rounds_trained"] == ROUNDS - 1


@pytest.mark.parametrize("refusal", [P.BUDGET_REFUSAL + ": over budget", "fedshield:plain-update-refused: no SecAgg+",
                                     "fedshield:policy-refused: dp required"])
def test_a_refusal_sent_before_charging_is_not_charged(tmp_path: Path, refusal: str) -> None:
    report = PrivacyReport(RunConfig(num_clients=3, num_rounds=ROUNDS, out=tmp_path), 1.0)
    report.record_round(_settings(1), [P.ClientReply(1, {}, error=refusal)])
    (entry,) = report.to_json()["clients"].values()
    assert entry["history"] == [] and entry["charged_unconfirmed"] == []
