"""A run's rows (``metrics.jsonl``) and its checkpoint after many rounds: each round appends its row, the checkpoint
carries only the rows metrics.jsonl does not hold on disk yet, loading one reads the rest back from there, and a
resume rewrites metrics.jsonl as of the checkpoint (a torn line after a power cut, a row past the checkpoint).
Real reporter, real files, real safetensors; the kill-and-resume of a real ``fedshield simulate`` is test_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save

from fedshield.config import RunConfig
from fedshield.errors import ConfigError
from fedshield.protocol import ClientReply
from fedshield.server import run_writer
from fedshield.server.checkpoint import CHECKPOINT_FILE, _metadata, load_checkpoint
from fedshield.server.plan import plan_run
from fedshield.server.reporter import RunReporter
from fedshield.strategies.outcomes import RoundOutcomes

MODEL = {"w": np.linspace(-1, 1, 6, dtype=np.float32)}


def _record(reporter: RunReporter, server_round: int) -> None:
    outcomes = RoundOutcomes(bytes_up=[64, 64])
    outcomes.settle([ClientReply(11, {"partition-id": 0}), ClientReply(12, {"partition-id": 1})])
    state = {k: torch.from_numpy(v) for k, v in MODEL.items()}
    reporter.record_round(server_round, state, {"accuracy": server_round / 100}, outcomes)
    reporter.flush()


def _manifest(out: Path) -> dict:  # type: ignore[type-arg]
    return json.loads(_metadata((out / CHECKPOINT_FILE).read_bytes())["manifest"])


def _lines(out: Path) -> list[str]:
    return (out / "metrics.jsonl").read_text().splitlines()


@pytest.fixture
def ten_rounds(tmp_path: Path) -> tuple[RunConfig, RunReporter]:
    config = RunConfig(num_clients=2, num_rounds=12, dp=False, secagg=False, out=tmp_path / "run")
    reporter = RunReporter(plan_run(config), {})
    for server_round in range(1, 11):
        _record(reporter, server_round)
    return config, reporter


def test_rows_are_appended_and_the_checkpoint_carries_only_the_last(
        ten_rounds: tuple[RunConfig, RunReporter], monkeypatch: pytest.MonkeyPatch) -> None:
    config, reporter = ten_rounds
    manifest = _manifest(config.out)
    assert (manifest["format"], manifest["rows_in_metrics"], [r["round"] for r in manifest["rounds"]]) == (
        "fedshield-checkpoint/2", 9, [10])
    rows = [json.loads(line) for line in _lines(config.out)]
    assert [r["round"] for r in rows] == list(range(1, 11))
    ckpt = load_checkpoint(config.out)
    assert ckpt.rounds == rows and ckpt.rows_in_metrics == 9
    written: list[tuple[str, int, bool]] = []
    real = run_writer._write
    monkeypatch.setattr(run_writer, "_write", lambda p, d, a: (written.append((p.name, len(d), a)), real(p, d, a)))
    _record(reporter, 11)
    metrics = [w for w in written if w[0] == "metrics.jsonl"]
    assert metrics == [("metrics.jsonl", len(_lines(config.out)[-1]) + 1, True)]  # one line appended, no rewrite
    reporter.writer.close()


def test_a_resume_rewrites_the_rows_as_of_the_checkpoint(ten_rounds: tuple[RunConfig, RunReporter]) -> None:
    """A power cut can tear the line appended after the last checkpoint (with bytes that are not UTF-8); a row
    past the checkpoint is not the resumed run's: both go, the checkpoint's own row comes back, and a run resumed
    twice without a round in between reads the same rows."""
    config, reporter = ten_rounds
    reporter.writer.close()
    good = _lines(config.out)
    (config.out / "metrics.jsonl").write_bytes(("\n".join(good[:9]) + '\n{"accuracy": 0.1, "rou').encode() + b"\xff")
    ckpt = load_checkpoint(config.out)
    assert [r["round"] for r in ckpt.rounds] == list(range(1, 11))
    resumed = RunReporter(plan_run(config, ckpt), {})
    resumed.resume(ckpt)
    assert _lines(config.out) == good  # repaired at once, before any round runs
    resumed.writer.close()
    (config.out / "metrics.jsonl").write_text("\n".join([*good, good[-1].replace('"round": 10', '"round": 11')]) + "\n")
    again = RunReporter(plan_run(config, load_checkpoint(config.out)), {})
    again.resume(load_checkpoint(config.out))
    assert _lines(config.out) == good  # round 11 was past the checkpoint
    _record(again, 11)
    assert [json.loads(x)["round"] for x in _lines(config.out)] == list(range(1, 12))
    assert load_checkpoint(config.out).rounds == [json.loads(x) for x in _lines(config.out)]
    again.writer.close()


def test_rows_missing_from_metrics_fail_the_resume_naming_the_fix(ten_rounds: tuple[RunConfig, RunReporter]) -> None:
    config, reporter = ten_rounds
    reporter.writer.close()
    (config.out / "metrics.jsonl").write_text("\n".join(_lines(config.out)[:5]) + "\n")
    with pytest.raises(ConfigError, match=r"leaves its first 9 rows to metrics\.jsonl.*holds 5 rows.*restore"):
        load_checkpoint(config.out)
    (config.out / "metrics.jsonl").write_text("\n".join(_lines(config.out)[1:]) + "\n")  # round 1 gone
    with pytest.raises(ConfigError, match=r"not the row of round 1"):
        load_checkpoint(config.out)


def test_a_format_1_checkpoint_with_every_row_inline_still_loads(tmp_path: Path) -> None:
    rows = [{"round": 1, "accuracy": 0.5}, {"round": 2, "accuracy": 0.6}]
    manifest = {"format": "fedshield-checkpoint/1", "server_round": 2, "run_id": "r", "noise_multiplier": 0.0,
                "model_keys": ["w"], "strategy_kinds": {}, "privacy_clients": [], "rounds": rows, "config": {},
                "extra": {}}
    (tmp_path / CHECKPOINT_FILE).write_bytes(save({"model/w": MODEL["w"]}, metadata={"manifest": json.dumps(manifest)}))
    ckpt = load_checkpoint(tmp_path)  # no metrics.jsonl needed: every row is in the file
    assert (ckpt.server_round, ckpt.rounds, ckpt.rows_in_metrics) == (2, rows, 0)


def test_what_a_round_reuses_is_what_encoding_everything_again_gives(tmp_path: Path) -> None:
    """privacy.json and the checkpoint's privacy records reuse each untouched client's text: after rounds that
    touched different clients (a failure too), both equal what a report rebuilt from scratch writes, DP epsilons
    included."""
    from fedshield.server.report import PrivacyReport

    config = RunConfig(num_clients=3, num_rounds=5, dp=True, noise_multiplier=1.1, secagg=False, out=tmp_path / "run")
    reporter = RunReporter(plan_run(config), {}, accounting_ahead=False)
    state = {k: torch.from_numpy(v) for k, v in MODEL.items()}
    touched = [[0, 1, 2], [0, 1], [0, 2], [1]]  # client 2 is left alone in the last two rounds but one
    for server_round, partitions in enumerate(touched, 1):
        outcomes = RoundOutcomes(bytes_up=[64] * len(partitions))
        outcomes.settle([ClientReply(10 + p, {"partition-id": p}) if p != 1 or server_round < 4 else
                         ClientReply(11, error="no reply before the round timed out") for p in partitions])
        reporter.record_round(server_round, state, {}, outcomes)
    reporter.flush()
    report = reporter.report
    scratch = PrivacyReport(config, 1.1)
    scratch.load_state(report.to_state())
    assert (config.out / "privacy.json").read_text() == run_writer.render_privacy_json(scratch.to_json(final=False))
    clients = json.loads((config.out / "privacy.json").read_text())["clients"]
    assert [clients[f"client-{p}"]["rounds_trained"] for p in range(3)] == [3, 2, 2]
    assert clients["client-1"]["failures"][0]["round"] == 4 and clients["client-2"]["epsilon"] > 0
    assert report.state_lines() == scratch.state_lines()
    assert load_checkpoint(config.out).privacy_clients == [json.loads(line) for line in scratch.state_lines()]
    reporter.writer.close()


def test_client_level_releases_are_one_line_each_and_parse_back_to_the_report(tmp_path: Path) -> None:
    from fedshield.strategies.outcomes import ReleaseEvent

    config = RunConfig(num_clients=4, num_rounds=30, dp=False, secagg=False, client_dp="central",
                       client_noise_multiplier=0.3, client_clip_norm=1.0, out=tmp_path / "run")
    reporter = RunReporter(plan_run(config), {})
    for server_round in (1, 2, 3):
        outcomes = RoundOutcomes(bytes_up=[64], release=ReleaseEvent(server_round, 0.3, 1.0, 1.0, 1.0))
        outcomes.settle([ClientReply(11, {"partition-id": 0})])
        reporter.record_round(server_round, {k: torch.from_numpy(v) for k, v in MODEL.items()}, {}, outcomes)
    reporter.flush()
    text = (config.out / "privacy.json").read_text()
    document = reporter.report.to_json(final=False)
    assert json.loads(text) == json.loads(json.dumps(document))
    assert text == run_writer.render_privacy_json(document, {})  # what the writer reused is what a fresh render gives
    releases = [line.strip().rstrip(",") for line in text.splitlines() if '"round":' in line]
    assert [json.loads(line)["round"] for line in releases] == [1, 2, 3]  # one line each
    reporter.writer.close()
