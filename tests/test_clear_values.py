"""Every clear value a site sends is checked before use: the unit-level contract behind
``tests/test_malicious_sites.py`` (which proves it end to end with a crafted site)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from _strategy_rounds import SHAPES, client_models, configure, reply, weighted_mean

from fedshield import protocol as P
from fedshield.strategies._secagg_stages import MaskedReply, ProtocolParams, RoundState
from fedshield.strategies.clear_values import check_clear_metrics, usable_metrics
from fedshield.strategies.recording import RecordingStrategy
from fedshield.strategies._secagg_clear import check_masked_clear
from fedshield.strategies.streaming import StreamingFedAvg
from fedshield.strategies.validation import REJECTED, UpdateValidation


@pytest.mark.parametrize(("metrics", "reason"), [
    ({P.EPSILON: math.nan}, "'epsilon' must be finite, got nan"),
    ({P.EPSILON: math.inf}, "'epsilon' must be finite, got inf"),
    ({P.STEPS: math.nan}, "'steps' must be finite"),
    ({P.STEPS: 2.5}, "'steps' must be a whole number in [0, 2**53], got 2.5"),
    ({P.STEPS: -1}, "'steps' must be a whole number"),
    ({P.PARTITION_ID: 1e300}, "'partition-id' must be a whole number"),
    ({P.EPSILON: -0.1}, "'epsilon' must be >= 0"),
    ({P.NUM_EXAMPLES: -3.0}, "'num-examples' must be >= 0"),
    ({P.EVAL_ACCURACY: 1.5}, "'accuracy' must be in [0, 1]"),
    ({"anything-new": math.nan}, "'anything-new' must be finite"),
    ({"list": [1.0, math.inf]}, "'list' must be finite"),
    ({P.NUM_EXAMPLES: 5000.0}, "above the largest weight a reply may carry (1000)"),
])
def test_out_of_range_clear_values_are_named(metrics: dict[str, float], reason: str) -> None:
    got = check_clear_metrics(metrics, max_weight=1000.0)
    assert got is not None and reason in got, got


def test_in_range_values_pass_and_only_usable_ones_are_kept() -> None:
    good = {P.NUM_EXAMPLES: 230, P.EPSILON: 7.9, P.STEPS: 40, P.TRAIN_LOSS: 0.3, P.PARTITION_ID: 2, "x": -1.5}
    assert check_clear_metrics(good, max_weight=1000.0) is None
    assert usable_metrics({**good, P.EPSILON: math.nan, P.STEPS: math.inf}) == {
        k: float(v) for k, v in good.items() if k not in (P.EPSILON, P.STEPS)}


@pytest.mark.usefixtures("task_identity")
def test_a_nan_epsilon_drops_the_reply_and_never_reaches_the_report() -> None:
    strategy = UpdateValidation(StreamingFedAvg(min_available_nodes=3, min_train_nodes=3), streams=True)
    messages = configure(strategy, 3)
    models = client_models(3, spread=0.1)
    replies = [reply(m, x, 10.0, epsilon=1.0) for m, x in zip(messages[:2], models[:2])]
    bad = reply(messages[2], models[2], 10.0, epsilon=math.nan)
    arrays, _ = strategy.aggregate_train(1, [*replies, bad])
    want = weighted_mean(models[:2], [10.0, 10.0])
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), want[key], rtol=1e-6, atol=1e-7)
    verdict = {r.node_id: r for r in strategy.last_replies}[messages[2].metadata.dst_node_id]
    assert verdict.error.startswith(REJECTED) and "'epsilon' must be finite" in verdict.error
    assert P.EPSILON not in verdict.metrics and verdict.metrics[P.NUM_EXAMPLES] == 10.0


@pytest.mark.usefixtures("task_identity")
def test_a_claimed_weight_above_max_weight_aggregates_at_max_weight() -> None:
    strategy = UpdateValidation(StreamingFedAvg(min_available_nodes=3, min_train_nodes=3), max_weight=100.0,
                                streams=True)
    messages = configure(strategy, 3)
    models = client_models(3, spread=0.1)
    replies = [reply(m, x, w) for m, x, w in zip(messages, models, (50.0, 50.0, 1e12))]
    arrays, _ = strategy.aggregate_train(1, replies)
    want = weighted_mean(models, [50.0, 50.0, 100.0])  # not 1e12: the liar weighs as much as the cap allows
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), want[key], rtol=1e-6, atol=1e-7)
    assert all(r.ok for r in strategy.last_replies)


def _state(num_samples: int) -> RoundState:
    params = ProtocolParams(num_samples=num_samples, num_shares=num_samples, threshold=2, clipping_range=8.0,
                            quantization_range=2**22, modulus_range=2**32, max_weight=1000.0)
    return RoundState(1, params, sampled=list(range(num_samples)), contents={}, active=set(range(num_samples)),
                      neighbours={})


@pytest.mark.parametrize(("count", "metrics", "reason"), [
    (230, {P.EPSILON: 2.0}, None),
    (5000, {}, None),  # above max_weight: clipped as before, still within this node's share of the field
    (204_799, {}, None),
    (204_801, {}, "a node may report at most 204799"),
    (10**12, {}, "reported 1000000000000 examples"),
    (-1, {}, "a count must be >= 0"),
    (230, {P.EPSILON: math.nan}, "'epsilon' must be finite"),
])
def test_secagg_drops_a_node_whose_clear_count_the_field_cannot_hold(
    count: int, metrics: dict[str, float], reason: str | None
) -> None:
    got = check_masked_clear(MaskedReply([], count, metrics), _state(5).params)
    assert got == reason if reason is None else (got is not None and reason in got), got


@pytest.mark.parametrize("received", [
    {P.RECEIVED_EXAMPLES: 40.0, P.RECEIVED_LOSS: math.nan, P.RECEIVED_ACCURACY: 0.5},
    {P.RECEIVED_EXAMPLES: 40.0, P.RECEIVED_LOSS: 0.3, P.RECEIVED_ACCURACY: 2.0},
    {P.RECEIVED_EXAMPLES: -1.0, P.RECEIVED_LOSS: 0.3, P.RECEIVED_ACCURACY: 0.5},
    {P.RECEIVED_ACCURACY: 0.5},  # incomplete
])
def test_a_bad_folded_evaluation_is_left_out_and_the_masked_vector_still_counts(received: dict[str, float]) -> None:
    """Under SecAgg+ the folded evaluation travels in clear beside the masked vector: a site's bad figure drops the
    figure, never the site's update (which an evaluate reply of its own never could)."""
    metrics = {P.EPSILON: 2.0, **received}
    assert check_masked_clear(MaskedReply([], 1, metrics), _state(5).params) is None
    assert metrics == {P.EPSILON: 2.0}
    good = {P.EPSILON: 2.0, P.RECEIVED_EXAMPLES: 40.0, P.RECEIVED_LOSS: 0.3, P.RECEIVED_ACCURACY: 0.5}
    kept = dict(good)
    assert check_masked_clear(MaskedReply([], 1, kept), _state(5).params) is None and kept == good


@pytest.mark.usefixtures("task_identity")
def test_an_out_of_range_evaluate_reply_is_left_out_of_the_federated_average() -> None:
    messages = configure(FedAvg(min_available_nodes=3, min_train_nodes=3), 3)
    values = [(10.0, 0.5), (10.0, 0.7), (10.0, math.nan)]
    replies = [Message(RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: n, P.EVAL_ACCURACY: a})}), reply_to=m)
               for m, (n, a) in zip(messages, values)]
    strategy = RecordingStrategy(FedAvg())
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None and metrics[P.EVAL_ACCURACY] == pytest.approx(0.6)
    assert strategy.last_evaluated == 2


def test_the_secagg_aggregate_reply_passes_the_clear_checks_its_nodes_passed() -> None:
    """Regression: the SecAgg+ synthetic reply averaged the nodes' counts (five nodes at rounds-trained 3 gave
    3.0000000000000004), UpdateValidation then rejected the whole aggregate and the global model silently stayed
    unchanged that round (the default job lost 5 of 20 rounds this way)."""
    from fedshield.strategies._secagg_stages import MaskedReply
    from fedshield.strategies._secagg_clear import average_clear_metrics

    honest = {P.EPSILON: 2.821851161663019, P.STEPS: 12.0, P.ROUNDS_TRAINED: 3.0}
    replies = [MaskedReply([], 1, dict(honest)) for _ in range(5)]
    averaged = average_clear_metrics(replies)
    assert averaged[P.ROUNDS_TRAINED] == 3.0 and averaged[P.STEPS] == 12.0
    assert check_clear_metrics({**averaged, P.NUM_EXAMPLES: 5.0}) is None
    mixed = [MaskedReply([], 1, {**honest, P.ROUNDS_TRAINED: float(r)}) for r in (3, 4)]
    assert average_clear_metrics(mixed)[P.ROUNDS_TRAINED] == 4.0  # a count some node reported, not 3.5
