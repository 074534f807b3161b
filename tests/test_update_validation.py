"""Update validation: a bad update (NaN, infinity, wrong keys, shapes or dtypes, too large) is rejected with its
reason and the round goes on; which keys are expected is learned from the replies, never from one lone reply."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Error, Message

from fedshield.config import RunConfig
from fedshield.strategies.registry import build
from fedshield.strategies.stack import build_strategy
from fedshield.strategies.streaming import StreamingFedAvg
from fedshield.strategies.validation import REJECTED, UpdateValidation

from _strategy_rounds import CASES, SHAPES, client_models, configure, reply, sampling, weighted_mean


# --- update validation ----------------------------------------------------------------------------------------


def _bad(model: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    m = dict(model)
    if kind == "nan":
        m["w"] = m["w"].copy()
        m["w"][0, 0] = np.nan
    elif kind == "inf-0d":
        m["s"] = np.asarray(np.inf)
    elif kind == "shape":
        m["b"] = np.zeros(5, dtype=np.float32)
    elif kind == "dtype":
        m["b"] = m["b"].astype(np.float64)
    elif kind == "missing":
        del m["b"]
    elif kind == "extra":
        m["x"] = np.zeros(1, dtype=np.float32)
    elif kind == "huge":
        m["w"] = m["w"] + np.float32(1000)
    return m


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nan", "'w' holds 1 non-finite value"),
        ("inf-0d", "'s' holds 1 non-finite value"),
        ("shape", "'b' has shape (5,) and dtype float32; the global model's is (4,) float32"),
        ("dtype", "'b' has shape (4,) and dtype float64"),
        ("missing", "missing ['b']"),
        ("extra", "unexpected ['x']"),
        ("huge", "exceeds max-update-norm 100"),
        ("negative-weight", "'num-examples' must be a finite number >= 0, got -3"),
        ("nan-weight", "'num-examples' must be a finite number >= 0, got nan"),
        ("metric-keys", "metric keys"),
        ("two-arrays", "expected one ArrayRecord and one MetricRecord"),
        # The Array's fields say what validation compares; its .npy bytes say what would be summed.
        ("lying-dtype", "'b' is not a readable array: array declares float32 (4,) but its bytes hold float64 (4,)"),
        ("lying-shape", "'b' is not a readable array: array declares float32 (4,) but its bytes hold float32 (1,)"),
    ],
)
def test_bad_update_is_rejected_with_a_reason_and_the_round_goes_on(kind: str, reason: str) -> None:
    strategy = UpdateValidation(StreamingFedAvg(min_available_nodes=4, min_train_nodes=4), max_update_norm=100.0,
                                streams=True)
    messages = configure(strategy, 4)
    models = client_models(4, spread=0.1)
    replies = [reply(m, x, 10.0) for m, x in zip(messages[:3], models[:3])]
    bad_msg = messages[3]
    if kind == "negative-weight":
        bad = reply(bad_msg, models[3], -3.0)
    elif kind == "nan-weight":
        bad = reply(bad_msg, models[3], float("nan"))
    elif kind == "metric-keys":
        bad = reply(bad_msg, models[3], 10.0, surprise=1.0)
    elif kind == "two-arrays":
        bad = reply(bad_msg, models[3], 10.0)
        bad.content["more"] = ArrayRecord({"w": Array(models[3]["w"])})
    elif kind in ("lying-dtype", "lying-shape"):
        bad = reply(bad_msg, models[3], 10.0)
        held = np.zeros(4, dtype=np.float64) if kind == "lying-dtype" else np.zeros(1, dtype=np.float32)
        record = next(iter(bad.content.array_records.values()))
        record["b"] = Array(dtype="float32", shape=(4,), stype="numpy.ndarray", data=Array(held).data)
    else:
        bad = reply(bad_msg, _bad(models[3], kind), 10.0)
    before = {k: bytes(a.data) for k, a in next(iter(bad.content.array_records.values())).items()}
    arrays, _ = strategy.aggregate_train(1, [*replies, bad])
    want = weighted_mean(models[:3], [10.0] * 3)  # never aggregated: the mean of the three good ones
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), want[key], rtol=1e-6, atol=1e-7)
    verdicts = {r.node_id: r for r in strategy.last_replies}
    rejected = verdicts[bad_msg.metadata.dst_node_id]
    assert not rejected.ok and rejected.error.startswith(f"{REJECTED}: ") and reason in rejected.error
    assert all(verdicts[m.metadata.dst_node_id].ok for m in messages[:3])
    after = {k: bytes(a.data) for k, a in next(iter(bad.content.array_records.values())).items()}
    assert after == before, "validation must not modify a reply"


@pytest.mark.usefixtures("task_identity")
def test_validation_reports_timeouts_and_error_replies_and_can_reject_everyone() -> None:
    strategy = UpdateValidation(StreamingFedAvg(min_available_nodes=3, min_train_nodes=3), streams=True)
    messages = configure(strategy, 3)
    models = client_models(3)
    failed = Message(Error(code=7, reason="fedshield:budget-exhausted: done"), reply_to=messages[1])
    arrays, _ = strategy.aggregate_train(1, [reply(messages[0], _bad(models[0], "nan"), 1.0), failed])
    assert arrays is None  # nothing acceptable: the global model stays as it was
    errors = {r.node_id: r.error for r in strategy.last_replies}
    assert errors[messages[0].metadata.dst_node_id].startswith(REJECTED)
    assert errors[messages[1].metadata.dst_node_id] == "fedshield:budget-exhausted: done"
    assert errors[messages[2].metadata.dst_node_id] == "no reply before the round timed out"


def _odd_first_round(strategy: Any, models: list[dict[str, np.ndarray]]) -> tuple[list[Message], list[Message]]:
    messages = configure(strategy, len(models))
    odd = reply(messages[0], models[0], 10.0, surprise=1.0)  # answers first, with a metric of its own
    return messages, [odd, *(reply(m, x, 10.0) for m, x in zip(messages[1:], models[1:]))]


@pytest.mark.usefixtures("task_identity")
def test_streaming_validation_takes_the_first_accepted_keys_then_last_rounds_majority() -> None:
    """One pass: in the first round the first acceptable reply sets the metric keys (the inner strategy's own
    reference); from then on the keys most replies carried in the previous round do."""
    strategy = UpdateValidation(StreamingFedAvg(min_available_nodes=5, min_train_nodes=5), streams=True)
    assert strategy.streams_replies
    models = client_models(5, spread=0.1)
    messages, replies = _odd_first_round(strategy, models)
    arrays, _ = strategy.aggregate_train(1, iter(replies))
    np.testing.assert_allclose(arrays["w"].numpy(), models[0]["w"], rtol=1e-6)  # only the odd one was accepted
    errors = {r.node_id: r.error for r in strategy.last_replies}
    assert errors[messages[0].metadata.dst_node_id] is None
    assert all("metric keys" in errors[m.metadata.dst_node_id] and "first accepted reply" in
               errors[m.metadata.dst_node_id] for m in messages[1:])
    messages, replies = _odd_first_round(strategy, models)
    arrays, _ = strategy.aggregate_train(2, iter(replies))
    want = weighted_mean(models[1:], [10.0] * 4)
    np.testing.assert_allclose(arrays["w"].numpy(), want["w"], rtol=1e-6)  # the majority rules again
    errors = {r.node_id: r.error for r in strategy.last_replies}
    assert "last round" in errors[messages[0].metadata.dst_node_id]
    assert all(errors[m.metadata.dst_node_id] is None for m in messages[1:])


@pytest.mark.usefixtures("task_identity")
def test_streaming_validation_does_not_carry_over_the_keys_of_a_lone_reply() -> None:
    """Under SecAgg+ validation sees one aggregated reply a round; its keys may change with who took part."""
    strategy = UpdateValidation(StreamingFedAvg(min_available_nodes=1, min_train_nodes=1), streams=True)
    model = client_models(1)[0]
    for server_round, extra in ((1, {}), (2, {"surprise": 1.0})):
        (msg,) = configure(strategy, 1)
        arrays, _ = strategy.aggregate_train(server_round, iter([reply(msg, model, 3.0, **extra)]))
        assert arrays is not None and strategy.last_replies[0].ok, strategy.last_replies


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", ["fedmedian", "krum"])
def test_validation_of_a_listing_strategy_keeps_the_majority_keys(name: str) -> None:
    """Strategies that list the replies themselves get the majority rule: one client answering first with odd
    keys cannot get the honest replies rejected and so defeat a robust aggregator."""
    strategy = UpdateValidation(build(name, CASES.get(name, {}), sampling=sampling(5)))
    assert not strategy.streams_replies
    models = client_models(5, spread=0.1)
    messages, replies = _odd_first_round(strategy, models)
    arrays, _ = strategy.aggregate_train(1, iter(replies))
    assert arrays is not None
    errors = {r.node_id: r.error for r in strategy.last_replies}
    assert "metric keys" in errors[messages[0].metadata.dst_node_id]
    assert all(errors[m.metadata.dst_node_id] is None for m in messages[1:])


def test_recording_sees_validation_verdicts_through_the_chain() -> None:
    layers = build_strategy(RunConfig(secagg=False, max_update_norm=10.0)).layers
    assert isinstance(layers[1], UpdateValidation) and layers[1].max_update_norm == 10.0


