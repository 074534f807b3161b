"""The pieces of a server run, each on its own: the run plan and round settings, the round's row, the shared
round state the strategy layers write (RoundOutcomes), and the reporter that owns the run directory and the
checkpoint (real files, real safetensors, real Flower strategies)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedshield import protocol as P
from fedshield.compression import quantize_update
from fedshield.config import RunConfig
from fedshield.errors import ConfigError
from fedshield.protocol import ARRAYS, BUDGET_REFUSAL, METRICS, NUM_EXAMPLES, ClientReply
from fedshield.server.checkpoint import Checkpoint, load_checkpoint, restore_strategy_state
from fedshield.server.plan import plan_run, round_settings
from fedshield.server.reporter import RunReporter
from fedshield.server.round_row import round_row
from fedshield.strategies.outcomes import ReleaseEvent, RoundOutcomes
from fedshield.strategies.stack import build_strategy
from fedshield.strategies.validation import REJECTED, UpdateValidation

from _grid import FakeGrid

GLOBAL = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(4, dtype=np.float32)}


def _arrays(model: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in model.items()})


def _reply(msg: Message, arrays: dict[str, np.ndarray], weight: float = 10.0) -> Message:
    return Message(RecordDict({ARRAYS: _arrays(arrays), METRICS: MetricRecord({NUM_EXAMPLES: weight})}), reply_to=msg)


# --- the plan and the round settings -------------------------------------------------------------------------


def test_a_new_run_gets_a_fresh_id_and_its_configured_mechanism() -> None:
    config = RunConfig(noise_multiplier=1.3, strategy="fedprox", strategy_params={"proximal_mu": 0.2})
    plan = plan_run(config, state_root="/x")
    assert len(plan.run_id) == 12 and plan.run_id != plan_run(config).run_id
    assert (plan.done, plan.noise_multiplier, plan.client_noise_multiplier) == (0, 1.3, None)
    settings = round_settings(plan, 3)
    assert (settings.server_round, settings.run_id, settings.noise_multiplier) == (3, plan.run_id, 1.3)
    assert (settings.proximal_mu, settings.sim_state_root, settings.num_rounds) == (0.2, "/x", config.num_rounds)


def test_a_resumed_run_keeps_its_id_round_and_mechanism() -> None:
    config = RunConfig(noise_multiplier=1.3, client_dp="distributed", client_clip_norm=1.0,
                       client_noise_multiplier=2.0, secagg=False, num_clients=4)
    ckpt = Checkpoint(server_round=2, run_id="abcdef012345", noise_multiplier=0.7, model=dict(GLOBAL),
                      rounds=[{}, {}], extra={"client_noise_multiplier": 1.5})
    plan = plan_run(config, ckpt)
    assert (plan.run_id, plan.done, plan.noise_multiplier, plan.client_noise_multiplier) == (
        "abcdef012345", 2, 0.7, 1.5)
    # Each of the 4 expected clients adds 1/sqrt(4) of the noise z C = 1.5: std 0.75.
    assert round_settings(plan, 3).client_noise_std_share == pytest.approx(0.75)


# --- the round's row ------------------------------------------------------------------------------------------


def test_the_row_counts_each_client_once_and_keeps_the_file_strict_json() -> None:
    outcomes = RoundOutcomes(bytes_up=[100, 201], evaluate=MetricRecord({"loss": 0.5, "accuracy": float("nan")}),
                             evaluated=2, evaluated_round=6)
    outcomes.settle([ClientReply(3, error=f"{REJECTED}: update norm 9 exceeds max-update-norm 5"), ClientReply(1),
                     ClientReply(4, error="no reply before the round timed out"),
                     ClientReply(2, error=f"{BUDGET_REFUSAL}: spent")])
    row = round_row(7, {"accuracy": 0.9, "loss": 0.3}, outcomes, epsilon_max=float("inf"), round_time_s=1.23456,
                    wall_time_s=10.0)
    json.dumps(row, allow_nan=False)
    assert row == {
        "round": 7, "accuracy": 0.9, "loss": 0.3, "federated_accuracy": None, "federated_loss": 0.5,
        "federated_round": 6, "clients_sampled": 4, "clients_trained": 1, "clients_evaluated": 2, "clients_refused": 1,
        "clients_rejected": 1, "clients_failed": 1,
        "rejected": [{"node_id": 3, "reason": "update norm 9 exceeds max-update-norm 5"}],
        "failed": [{"node_id": 4, "reason": "no reply before the round timed out"}],
        "epsilon_max": None, "bytes_up_per_client": 150, "round_time_s": 1.235, "wall_time_s": 10.0,
    }


# --- RoundOutcomes as the layers write it ------------------------------------------------------------------------


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("bits", [8, 16])
def test_dequantized_replies_keep_their_clients_node(bits: int) -> None:
    """The bug this state object exposed: a restored reply must stay the client's, not the server's."""
    stack = build_strategy(RunConfig(num_clients=3, secagg=False, dp=False, quantize=bits))
    grid: Any = FakeGrid(3)
    messages = list(stack.top.configure_train(1, _arrays(GLOBAL), ConfigRecord({}), grid))
    rng = np.random.default_rng(0)
    replies = [_reply(m, quantize_update({k: np.full_like(v, 0.01 * (i + 1)) for k, v in GLOBAL.items()},
                                          bits=bits, rng=rng))
               for i, m in enumerate(messages)]
    arrays, _ = stack.top.aggregate_train(1, iter(replies))
    assert arrays is not None
    np.testing.assert_allclose(arrays["w"].numpy(), GLOBAL["w"] + 0.02, atol=0.01)
    assert [(r.node_id, r.ok) for r in stack.outcomes.replies] == [(n, True) for n in sorted(FakeGrid(3).ids)]


@pytest.mark.usefixtures("task_identity")
def test_a_folded_evaluation_is_the_test_size_weighted_mean_of_the_accepted_replies() -> None:
    """Round 1 of 3 asks its trainers to evaluate the model they receive; the round's federated evaluation is then
    theirs (of round 0's model), weighted by test-split size. A rejected reply's figures count for nothing, a bad
    evaluation is left out without costing its update, and the strategy below never sees the evaluation figures."""
    stack = build_strategy(RunConfig(num_clients=4, num_rounds=3, secagg=False, dp=False, max_update_norm=5.0))
    messages = list(stack.top.configure_train(1, _arrays(GLOBAL), ConfigRecord({}), FakeGrid(4)))  # type: ignore[arg-type]
    assert all(m.content["config"][P.EVALUATE_RECEIVED] is True for m in messages)
    # The third's update is rejected; the fourth's evaluation is out of range (accuracy 2): its update counts.
    figures = [(10.0, 0.5, 0.9), (30.0, 1.0, 0.5), (50.0, 9.0, 0.0), (20.0, 0.3, 2.0)]
    replies = []
    for i, (msg, fig) in enumerate(zip(messages, figures, strict=True)):
        reply = _reply(msg, {k: v + (100.0 if i == 2 else 0.01) for k, v in GLOBAL.items()})
        if fig is not None:
            reply.content[METRICS].update(dict(zip(P.RECEIVED_KEYS, fig)))
        replies.append(reply)
    seen: list[set[str]] = []
    inner = stack.layers[-1]
    original = inner.aggregate_train
    inner.aggregate_train = lambda r, rs: original(r, [seen.append(set(m.content[METRICS])) or m for m in rs])  # type: ignore[method-assign]
    stack.top.aggregate_train(1, iter(replies))
    assert seen and all(keys == {NUM_EXAMPLES} for keys in seen)
    assert list(stack.top.configure_evaluate(1, _arrays(GLOBAL), ConfigRecord({}), FakeGrid(4))) == []  # type: ignore[arg-type]
    evaluated = stack.top.aggregate_evaluate(1, [])
    assert evaluated is not None
    assert evaluated[P.EVAL_ACCURACY] == pytest.approx((10 * 0.9 + 30 * 0.5) / 40)
    assert evaluated[P.EVAL_LOSS] == pytest.approx((10 * 0.5 + 30 * 1.0) / 40)
    assert (stack.outcomes.evaluated, stack.outcomes.evaluated_round) == (2, 0)
    by_node = sorted(range(4), key=lambda i: messages[i].metadata.dst_node_id)  # replies are sorted by node id
    assert [r.ok for r in stack.outcomes.replies] == [i != 2 for i in by_node]


@pytest.mark.usefixtures("task_identity")
def test_a_rejected_secagg_sum_rejects_each_included_client() -> None:
    outcomes = RoundOutcomes()
    layer = UpdateValidation(FedAvg(min_available_nodes=1, min_train_nodes=1), max_update_norm=0.1,
                             outcomes=outcomes, aggregated_replies=True)
    (msg,) = layer.configure_train(1, _arrays(GLOBAL), ConfigRecord({}), FakeGrid(1))  # type: ignore[arg-type]
    outcomes.settle([ClientReply(5, {NUM_EXAMPLES: 1.0}), ClientReply(6, error="timed out in stage setup")])
    arrays, _ = layer.aggregate_train(1, [_reply(msg, {k: v + 1 for k, v in GLOBAL.items()})])
    assert arrays is None
    five, six = outcomes.replies
    assert five.error is not None and five.error.startswith(f"{REJECTED}: update norm") and "SecAgg+ sum" in five.error
    assert five.metrics == {NUM_EXAMPLES: 1.0} and six.error == "timed out in stage setup"


def test_the_stack_names_its_layers_and_the_one_stateful_layer() -> None:
    stack = build_strategy(RunConfig(strategy="fedadam", secagg=False, quantize=8, client_dp="central",
                                     client_clip_norm=1.0, client_noise_multiplier=1.0, dp=False, num_clients=4))
    names = [type(layer).__name__ for layer in stack.layers]
    assert names == ["RecordingStrategy", "DequantizeUpdates", "UpdateValidation", "ClientLevelDP", "FedAdam"]
    assert stack.layers[0] is stack.top and dict(stack.stateful) == {"strategy": stack.layers[-1]}
    assert all(getattr(layer, "outcomes", stack.outcomes) is stack.outcomes for layer in stack.layers)
    assert stack.layers[1].streams_replies and stack.layers[2].streams_replies  # ClientLevelDP folds one by one
    secagg = build_strategy(RunConfig(secagg=True, quantize=8, num_clients=4))  # SecAgg+'s field quantizes
    assert [type(layer).__name__ for layer in secagg.layers] == [
        "RecordingStrategy", "SecAggPlus", "UpdateValidation", "StreamingFedAvg"]


# --- the reporter: run directory, privacy report, checkpoint ------------------------------------------------------


def _ticks() -> Iterator[float]:
    yield from (100.0, 101.5, 104.0, 110.0)


@pytest.fixture
def fedadam_run(tmp_path: Path) -> tuple[RunConfig, RunReporter]:
    config = RunConfig(strategy="fedadam", num_clients=2, num_rounds=3, dp=False,  # no accountant: fast
                       secagg=False, out=tmp_path / "run")
    stack = build_strategy(config)
    named = stack.stateful["strategy"]
    named.m_t = {"w": np.full((3, 4), 0.5, np.float32)}  # type: ignore[attr-defined]
    named.v_t = {"w": np.full((3, 4), 0.25, np.float32)}  # type: ignore[attr-defined]
    clock = _ticks()
    return config, RunReporter(plan_run(config), stack.stateful, clock=lambda: next(clock))


def test_the_reporter_writes_the_round_and_a_checkpoint_to_resume_from(
        fedadam_run: tuple[RunConfig, RunReporter]) -> None:
    config, reporter = fedadam_run
    assert json.loads((config.out / "config.json").read_text())["strategy"] == "fedadam"
    reporter.start_round()  # 101.5
    outcomes = RoundOutcomes(bytes_up=[64, 64], release=ReleaseEvent(1, 1.0, 1.0, 2.0, 2.0))
    outcomes.settle([ClientReply(11, {"partition-id": 0}), ClientReply(12, {"partition-id": 1})])
    state = {k: torch.from_numpy(v) for k, v in GLOBAL.items()}
    record = reporter.record_round(1, state, {"accuracy": 0.5}, outcomes)  # 104.0
    assert (record.row["round_time_s"], record.row["wall_time_s"], record.row["clients_trained"]) == (2.5, 4.0, 2)
    assert sorted(record.client_epsilons) == ["client-0", "client-1"]
    reporter.flush()  # the round's files are written in the background
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    privacy = json.loads((config.out / "privacy.json").read_text())
    assert rows == [record.row] and privacy["clients"]["client-1"]["trained_in_rounds"] == [1]
    ckpt = load_checkpoint(config.out)
    assert (ckpt.server_round, ckpt.run_id, ckpt.rounds) == (1, reporter.plan.run_id, rows)
    np.testing.assert_array_equal(ckpt.model["w"], GLOBAL["w"])

    fresh = build_strategy(config)
    resumed = RunReporter(plan_run(config, ckpt), fresh.stateful)
    resumed.resume(ckpt)
    np.testing.assert_array_equal(fresh.stateful["strategy"].m_t["w"], 0.5)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(fresh.stateful["strategy"].v_t["w"], 0.25)  # type: ignore[attr-defined]
    assert resumed.summary.rounds == rows and resumed.report.to_state() == reporter.report.to_state()


def test_checkpoints_of_the_wrapper_chain_era_restore_onto_the_named_strategy() -> None:
    stack = build_strategy(RunConfig(strategy="fedavgm", secagg=False))
    momentum = {"w": ("dict", {"w": np.ones(3)})}
    restore_strategy_state(stack.stateful, {"s.inner.inner.momentum_vector": momentum["w"]})
    np.testing.assert_array_equal(stack.stateful["strategy"].momentum_vector["w"], 1.0)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="resume with the same --strategy"):
        restore_strategy_state(stack.stateful, {"s.inner.secagg.m_t": momentum["w"]})


def test_the_privacy_state_is_every_field_of_every_client_as_asdict_gives_it(tmp_path: Path) -> None:
    """PrivacyReport.to_state is written by hand (asdict deep-copies every value after every round); a field added
    to ClientPrivacy and forgotten there would silently vanish from checkpoints."""
    import dataclasses

    from fedshield.server.report import ClientPrivacy, PrivacyReport

    report = PrivacyReport(RunConfig(out=tmp_path / "run"), 1.1)
    report.clients["client-0"] = ClientPrivacy("client-0", 7, 0, history=[(1.1, 0.5, 4)], rounds_trained=[1, 2],
                                               reported_epsilon=0.5, reported_steps=8, stopped_on_budget=True,
                                               stopped_round=2, failures=[{"round": 3, "reason": "x"}],
                                               charged_unconfirmed=[3])
    report.clients["node-9"] = ClientPrivacy("node-9", 9)
    state = report.to_state()
    assert state == json.loads(json.dumps([dataclasses.asdict(c) for c in report.clients.values()]))  # as JSON keeps it
    restored = PrivacyReport(RunConfig(out=tmp_path / "run"), 1.1)
    restored.load_state(state)
    assert restored.clients == report.clients


def _record(reporter: RunReporter, server_round: int) -> None:
    outcomes = RoundOutcomes(bytes_up=[64, 64])
    outcomes.settle([ClientReply(11, {"partition-id": 0}), ClientReply(12, {"partition-id": 1})])
    reporter.record_round(server_round, {k: torch.from_numpy(v) for k, v in GLOBAL.items()}, {}, outcomes)


def test_a_rounds_files_are_written_in_order_behind_the_next_round_and_a_failed_write_is_raised(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The round loop does not wait for its files: record_round returns while they are still being written, in
    order (checkpoint, metrics, model, privacy), on another thread; the next round waits for them (never more than
    one round behind), and a write that failed is raised by the next round, not lost."""
    import threading

    from fedshield.server import run_writer

    config = RunConfig(num_clients=2, num_rounds=3, dp=False, secagg=False, out=tmp_path / "run")
    reporter = RunReporter(plan_run(config), {})
    gate, written, appended = threading.Event(), [], []
    real = run_writer._write

    def gated(path: Path, data: bytes, append: bool) -> None:
        assert gate.wait(30) and threading.current_thread() is not threading.main_thread()
        if path.name == "model.safetensors" and len(written) > 4:
            raise OSError(28, "No space left on device")
        written.append(path.name)
        appended.append(append)
        real(path, data, append)

    monkeypatch.setattr(run_writer, "_write", gated)
    _record(reporter, 1)  # returns with the gate shut: nothing written yet
    assert written == [] and not (config.out / "metrics.jsonl").exists()
    gate.set()
    _record(reporter, 2)  # waited for round 1's files first
    assert written[:4] == ["checkpoint.safetensors", "metrics.jsonl", "model.safetensors", "privacy.json"]
    with pytest.raises(OSError, match="No space left"):
        reporter.flush()  # round 2's model write failed
    assert written[4:] == ["checkpoint.safetensors", "metrics.jsonl"]  # the checkpoint before the failure
    assert appended == [False] * 5 + [True]  # round 2's row is appended to round 1's file, every other file replaced
    assert load_checkpoint(config.out).server_round == 2
    reporter.writer.close()


def test_a_closed_round_is_recorded_as_it_ended_whatever_the_next_round_changes(
        fedadam_run: tuple[RunConfig, RunReporter]) -> None:
    """The server records a round on a background thread while the next one runs (runner._AfterRound): what the
    next round replaces (the strategy's moments, the outcomes' replies and byte counts) is the ended round's."""
    config, reporter = fedadam_run
    reporter.start_round()  # 101.5
    outcomes = RoundOutcomes(bytes_up=[64, 64])
    outcomes.settle([ClientReply(11, {"partition-id": 0}), ClientReply(12, {"partition-id": 1})])
    closed = reporter.close_round(1, {k: torch.from_numpy(v) for k, v in GLOBAL.items()}, outcomes)  # 104.0
    named = reporter.stateful["strategy"]
    named.m_t = {"w": np.full((3, 4), 9.0, np.float32)}  # type: ignore[attr-defined]  # the next round's
    outcomes.settle([ClientReply(11, {"partition-id": 0}, error="later round")])
    outcomes.bytes_up.append(999)
    record = reporter.record_closed(closed, {"accuracy": 0.5})
    reporter.flush()
    assert (record.row["round_time_s"], record.row["clients_trained"], record.row["clients_failed"]) == (2.5, 2, 0)
    assert record.row["bytes_up_per_client"] == 64
    np.testing.assert_array_equal(load_checkpoint(config.out).strategy_state["strategy.m_t"][1]["w"], 0.5)


def test_metrics_lines_follow_the_rows_when_they_are_replaced(tmp_path: Path) -> None:
    """metrics.jsonl encodes each row once; rows replaced as a whole (a resume) are encoded again."""
    from fedshield.server.run_writer import RunWriter

    writer = RunWriter(tmp_path)
    writer.rounds = [{"round": 1, "accuracy": 0.5}]
    writer.write_metrics()
    writer.rounds.append({"round": 2, "accuracy": 0.6})
    writer.write_metrics()
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    writer.rounds = [{"round": 1, "accuracy": 0.7}]
    writer.write_metrics()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"accuracy": 0.7, "round": 1}\n'


def test_one_behind_runs_jobs_in_order_one_at_a_time_and_raises_a_failure_at_the_next_call() -> None:
    import threading

    from fedshield.server.one_behind import OneBehind

    behind, done, names = OneBehind("test-behind"), [], set()
    gates = [threading.Event() for _ in range(4)]

    def job(i: int) -> None:
        assert gates[i].wait(timeout=30)
        names.add(threading.current_thread().name)
        done.append(i)

    for i in range(3):
        behind.submit(job, i)
        assert done == list(range(i))  # the previous job finished before this one started; this one waits
        gates[i].set()
    behind.wait()
    assert done == [0, 1, 2] and all(n.startswith("test-behind") for n in names)

    def fail() -> None:
        raise OSError("disk full")

    behind.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        behind.submit(job, 3)  # the failure surfaces at the next call, and that job does not start
    gates[3].set()
    behind.close()
    behind.close()
    assert done == [0, 1, 2]
