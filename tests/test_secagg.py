"""SecAgg+ on the Message API: fedshield's SecAggPlus strategy with fedshield's port of ``secaggplus_mod`` on clients.

Two harnesses:

* ``_LocalGrid`` delivers messages to a ClientApp in this process through a protobuf round trip (as the wire
  does), so dropout patterns at every stage run in milliseconds;
* Flower's real simulation engine (Ray) for the end-to-end checks, with hygiene checks on what it leaves behind
  (``test_secagg_simulation.py``).

The reference is the plain example-weighted average of the same client updates, computed here with numpy. The
tolerance follows from the protocol's arithmetic (see ``_tolerance``), not from a constant: for the full-precision
field and for the fields sized for 8- and 16-bit updates (``quantize``) alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp.strategy import FedAvg

from fedshield.client.secagg_mod import CLEAR_METRICS, secagg_adapter_mod, to_fitres_content
from fedshield.compression import quantize_update, secagg_field, wire_dtype
from fedshield.config import RunConfig
from fedshield.errors import ConfigError, FedshieldError, ProtocolError
from fedshield.protocol import (
    ARRAYS,
    BUDGET_REFUSAL,
    EPSILON,
    METRICS,
    NUM_EXAMPLES,
    PARTITION_ID,
    SECAGG_COUNT,
    TRAIN_LOSS,
    ClientReply,
)
from fedshield.strategies.secagg import SecAggPlus

from _secagg_harness import (
    MAX_WEIGHT,
    SHAPES,
    _LocalGrid,
    as_numpy,
    assert_weighted_average,
    field,
    initial_arrays,
    make_client_app,
    ok_partitions,
    run_local,
    run_local_recorded,
)


# --- fast protocol tests ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("task_identity")
def test_local_aggregate_equals_weighted_average_over_rounds() -> None:
    models, replies = run_local(5, num_rounds=2)
    for rnd in (1, 2):
        assert [r.ok for r in replies[rnd - 1]] == [True] * 5
        assert_weighted_average(models[rnd - 1], models[rnd], [0, 1, 2, 3, 4], rnd)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("stage", "fault", "expected_error", "contributes"),
    [
        (Stage.SETUP, "timeout", "timed out in stage setup", False),
        (Stage.SHARE_KEYS, "boom", "boom", False),
        (Stage.COLLECT_MASKED_VECTORS, "timeout", "timed out in stage collect_masked_vectors", False),
        (Stage.UNMASK, "timeout", None, True),  # its vector is in the sum; neighbours' shares remove its mask
    ],
)
def test_local_dropout_at_each_stage(stage: str, fault: str, expected_error: str | None, contributes: bool) -> None:
    models, replies = run_local(5, fault=lambda p, s: fault if (p, s) == (2, stage) else None)
    by_partition = {r.node_id: r for r in replies[0]}
    dropped = [r for r in replies[0] if not r.ok]
    assert [r.error for r in dropped] == ([] if expected_error is None else [expected_error])
    assert len(by_partition) == 5
    partitions = [0, 1, 2, 3, 4] if contributes else [0, 1, 3, 4]
    assert_weighted_average(models[0], models[1], partitions, 1)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("stage", [Stage.SETUP, Stage.SHARE_KEYS, Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK])
def test_local_malformed_reply_drops_the_node_not_the_server(stage: str) -> None:
    models, replies = run_local(5, fault=lambda p, s: "malformed" if (p, s) == (3, stage) else None)
    dropped = [r for r in replies[0] if not r.ok]
    if stage == Stage.UNMASK:  # its vector is already in the sum; the others' shares suffice
        assert dropped == []
        assert_weighted_average(models[0], models[1], [0, 1, 2, 3, 4], 1)
    else:
        assert len(dropped) == 1 and str(dropped[0].error).startswith(f"malformed reply in stage {stage}")
        assert_weighted_average(models[0], models[1], [0, 1, 2, 4], 1)


@pytest.mark.usefixtures("task_identity")
def test_local_two_neighbours_dropping_together_leave_a_correct_sum() -> None:
    # With 6 nodes every node is a neighbour of every other: partitions 1 and 4 masked with each other and with
    # every survivor; only the masks with survivors are in the sum and must be removed.
    def fault(partition: int, stage: str) -> str | None:
        return "timeout" if partition in (1, 4) and stage == Stage.COLLECT_MASKED_VECTORS else None

    models, replies = run_local(6, fault=fault)
    assert ok_partitions(replies[0]) == [0, 2, 3, 5]
    assert_weighted_average(models[0], models[1], [0, 2, 3, 5], 1)


@pytest.mark.usefixtures("task_identity")
def test_local_refusal_reason_reaches_the_server_verbatim() -> None:
    models, replies = run_local(4, refusing=0)
    (refused,) = [r for r in replies[0] if not r.ok]
    assert refused.error is not None and f"{BUDGET_REFUSAL} test" in refused.error
    assert refused.metrics == {}
    assert ok_partitions(replies[0]) == [1, 2, 3]
    assert_weighted_average(models[0], models[1], [1, 2, 3], 1)


@pytest.mark.usefixtures("task_identity")
def test_local_round_fails_cleanly_below_threshold() -> None:
    # threshold 4 of 5 shares: two dropouts leave 3 vectors, too few to unmask safely.
    models, replies = run_local(
        5, num_rounds=2, reconstruction_threshold=4, num_shares=5,
        fault=lambda p, s: "timeout" if p in (0, 1) and s == Stage.COLLECT_MASKED_VECTORS else None,
    )
    for rnd in (1, 2):
        np.testing.assert_equal(models[rnd], models[0])  # global model unchanged, next round still runs
        assert not any(r.ok for r in replies[rnd - 1])
        errors = sorted(str(r.error) for r in replies[rnd - 1])
        assert errors[-2:] == ["timed out in stage collect_masked_vectors"] * 2
        assert all(e.startswith("round aborted:") for e in errors[:3])
        assert all(r.metrics for r in replies[rnd - 1] if r.error.startswith("round aborted"))  # type: ignore[union-attr]


@pytest.mark.usefixtures("task_identity")
def test_a_site_that_declares_one_count_and_masks_another_fails_the_integrity_check() -> None:
    """docs/THREAT-MODEL.md: a site declares one example count in clear and masks another under SecAgg+. The
    server cannot see the masked weight, but the unmasked sum of weights must equal the declared ones: the round is
    discarded as a whole (the model does not move) with the reason, and the next round, with no liar, goes on."""
    honest = make_client_app()

    def lying(msg: Message, ctx: Context) -> Message:
        stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])  # read before the mod consumes it
        config = msg.content.config_records.get("config") or {}  # stage 2 carries the train config
        liar = int(ctx.node_config["partition-id"]) == 0 and config.get("server-round") == 1
        reply = honest(msg, ctx)
        if liar and stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
            declared = reply.content.config_records[RECORD_KEY_CONFIGS]  # the compact reply: the count beside the vector
            declared[SECAGG_COUNT] = int(declared[SECAGG_COUNT]) + 300  # masked as n, declared as n + 300
        return reply

    grid = _LocalGrid(honest, 4)
    grid._app = lying  # type: ignore[assignment]
    strategy = SecAggPlus(FedAvg(fraction_evaluate=0.0, min_available_nodes=4), max_weight=MAX_WEIGHT)
    models: list[dict[str, np.ndarray]] = []
    replies: list[list[ClientReply]] = []

    def record(rnd: int, arrays: ArrayRecord) -> None:
        models.append(as_numpy(arrays))
        if rnd:
            replies.append(list(strategy.last_replies))

    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=2, evaluate_fn=record)
    np.testing.assert_equal(models[1], models[0])  # round 1 discarded as a whole
    assert not any(r.ok for r in replies[0])
    assert all("integrity check failed: masked weights sum to" in str(r.error) for r in replies[0]), replies[0]
    assert ok_partitions(replies[1]) == [0, 1, 2, 3]  # round 2: nobody lies, the run goes on
    assert_weighted_average(models[1], models[2], [0, 1, 2, 3], 2)


@pytest.mark.usefixtures("task_identity")
def test_clear_metrics_are_the_allowlist_only() -> None:
    _, replies = run_local(3)
    for reply in replies[0]:
        assert set(reply.metrics) == {NUM_EXAMPLES, EPSILON, PARTITION_ID}
        assert TRAIN_LOSS not in reply.metrics


# --- quantized fields (--quantize under SecAgg+) ------------------------------------------------------------


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("bits", [8, 16])
def test_local_quantized_aggregate_is_fedavg_within_the_field_bound(bits: int) -> None:
    out = run_local_recorded(5, num_rounds=2, config_quantize=bits)
    clip, levels = field(bits, 5)
    for rnd in (1, 2):
        assert [r.ok for r in out["replies"][rnd - 1]] == [True] * 5
        assert_weighted_average(out["models"][rnd - 1], out["models"][rnd], [0, 1, 2, 3, 4], rnd,
                                clip=clip, levels=levels)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("bits", "dtype"), [(0, np.uint32), (8, np.uint16), (16, np.uint32)])
def test_local_masked_vectors_travel_in_the_narrowest_type_of_the_field(bits: int, dtype: type) -> None:
    # 5 clients: the 8-bit field is 2**11 (5 x 255 < 2048), the 16-bit one 2**19; the full-precision field is
    # Flower's 2**32, sent as uint32 instead of Flower's int64 (lossless: every masked value is below 2**32).
    out = run_local_recorded(5, config_quantize=bits)
    modulus = secagg_field(bits, 5)[1] if bits else 2**32
    assert len(out["grid"].masked) == 5
    for vector in out["grid"].masked:
        assert {a.dtype for a in vector} == {np.dtype(dtype)}
        assert all(int(a.max(initial=0)) < modulus for a in vector)
    assert np.dtype(dtype) == wire_dtype(modulus)


@pytest.mark.usefixtures("task_identity")
def test_local_eight_bit_updates_halve_the_full_precision_secagg_upload() -> None:
    """Under SecAgg+ the masked values live in a field: 2**32 at full precision (uint32 on the wire), 2**11 for
    8 bits and 5 clients (uint16), 2**19 for 16 bits (uint32 again: 16 bits save nothing over full precision
    here, they only coarsen it)."""
    values = sum(int(np.prod(shape)) for shape, _ in SHAPES.values())
    sent = {bits: run_local_recorded(5, config_quantize=bits)["bytes_up"][0] for bits in (0, 8, 16)}
    assert all(len(b) == 5 for b in sent.values())
    mean = {bits: sum(b) / len(b) for bits, b in sent.items()}
    assert mean[0] >= 4 * values and mean[8] >= 2 * values and mean[16] >= 4 * values  # the masked vector is counted
    assert mean[8] <= 0.55 * mean[0], mean
    assert mean[16] <= mean[0], mean


@pytest.mark.usefixtures("task_identity")
def test_local_quantized_field_survives_a_dropout_and_an_int64_client() -> None:
    # A client without the wire mod (an older fedshield) sends int64 even when asked to narrow: still correct.
    out = run_local_recorded(5, config_quantize=8, narrow=False,
                             fault=lambda p, s: "timeout" if (p, s) == (2, Stage.COLLECT_MASKED_VECTORS) else None)
    assert ok_partitions(out["replies"][0]) == [0, 1, 3, 4]
    assert {a.dtype for v in out["grid"].masked for a in v} == {np.dtype(np.int64)}
    clip, levels = field(8, 5)  # the field is sized at SETUP, for the 5 sampled nodes
    assert_weighted_average(out["models"][0], out["models"][1], [0, 1, 3, 4], 1, clip=clip, levels=levels)


@pytest.mark.usefixtures("task_identity")
def test_local_clipped_update_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="fedshield.client.secagg_mod"):
        run_local_recorded(3, config_quantize=8, clipping_range=0.01)
    assert sum("SecAgg+ will clip this update" in r.getMessage() for r in caplog.records) == 3


@pytest.mark.usefixtures("task_identity")
def test_explicit_quantize_overrides_the_round_config() -> None:
    out = run_local_recorded(3, config_quantize=16, quantize=8)
    assert {a.dtype for v in out["grid"].masked for a in v} == {np.dtype(np.uint16)}  # 8 bits: 3 x 255 < 2**10
    out = run_local_recorded(3, config_quantize=8, quantize=0)
    assert {a.dtype for v in out["grid"].masked for a in v} == {np.dtype(np.uint32)}  # full precision: 2**32


# --- adapter unit tests ---------------------------------------------------------------------------------------


def test_adapter_sends_local_minus_global_and_drops_non_ledger_metrics() -> None:
    glob = ArrayRecord({"a": Array(np.array([1.0, 2.0], dtype=np.float32)), "s": Array(np.asarray(3.0))})
    local = ArrayRecord({"s": Array(np.asarray(2.5)), "a": Array(np.array([1.5, 1.0], dtype=np.float32))})
    reply = RecordDict(
        {ARRAYS: local, METRICS: MetricRecord({NUM_EXAMPLES: 12, EPSILON: 0.7, TRAIN_LOSS: 0.3, "accuracy": 0.9})}
    )
    from flwr.common import parameters_to_ndarrays
    from flwr.compat.common.recorddict_compat import recorddict_to_fitres

    fitres = recorddict_to_fitres(to_fitres_content(glob, reply), keep_input=True)
    delta = parameters_to_ndarrays(fitres.parameters)
    np.testing.assert_array_equal(delta[0], [0.5, -1.0])  # global key order, not the reply's
    np.testing.assert_array_equal(delta[1], -0.5)
    assert fitres.num_examples == 12
    assert dict(fitres.metrics) == {EPSILON: 0.7}
    assert set(CLEAR_METRICS) >= set(fitres.metrics)


@pytest.mark.usefixtures("task_identity")
def test_adapter_turns_an_error_reply_into_an_exception_with_the_same_reason() -> None:
    content = RecordDict({ARRAYS: ArrayRecord({"a": Array(np.zeros(2))}), RECORD_KEY_CONFIGS: ConfigRecord({})})
    msg = Message(content, dst_node_id=5, message_type="train")
    ctx = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})

    def refuse(m: Message, _c: Context) -> Message:
        return Message(Error(code=2, reason=f"{BUDGET_REFUSAL} after 3 rounds"), reply_to=m)

    with pytest.raises(FedshieldError, match=f"^{BUDGET_REFUSAL} after 3 rounds$"):
        secagg_adapter_mod(msg, ctx, refuse)


def test_adapter_refuses_an_update_the_client_quantized_itself() -> None:
    glob = ArrayRecord({"a": Array(np.zeros(8, np.float32))})
    packed = quantize_update({"a": np.linspace(-1, 1, 8, dtype=np.float32)}, bits=8, rng=np.random.default_rng(0))
    reply = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in packed.items()}),
                        METRICS: MetricRecord({NUM_EXAMPLES: 1})})
    with pytest.raises(ProtocolError, match="must send quantize 0 with SecAgg"):
        to_fitres_content(glob, reply)


@pytest.mark.parametrize(
    ("local", "metrics", "match"),
    [
        ({"a": np.zeros(2)}, {}, "num-examples"),
        ({"b": np.zeros(2)}, {NUM_EXAMPLES: 1}, "missing \\['a'\\]"),
        ({"a": np.zeros(3)}, {NUM_EXAMPLES: 1}, "shape"),
        ({"a": np.zeros(2)}, {NUM_EXAMPLES: 2.5}, "whole number"),
    ],
)
def test_adapter_rejects_malformed_replies(local: dict[str, Any], metrics: dict[str, Any], match: str) -> None:
    glob = ArrayRecord({"a": Array(np.zeros(2))})
    reply = RecordDict({ARRAYS: ArrayRecord({k: Array(v) for k, v in local.items()}), METRICS: MetricRecord(metrics)})
    with pytest.raises(ProtocolError, match=match):
        to_fitres_content(glob, reply)


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_shares": 5, "reconstruction_threshold": 6}, "must be <= num_shares"),
        ({"num_shares": 2}, "num_shares as a count must be >= 3"),
        ({"num_shares": 1.5}, "fraction must be in"),
        ({"reconstruction_threshold": 0.0}, "fraction must be in"),
        ({"reconstruction_threshold": 1}, "count must be >= 2"),
        ({"reconstruction_threshold": True}, "int count or a float"),
        ({"clipping_range": 0.0}, "clipping_range must be a finite number > 0"),
        ({"clipping_range": float("inf")}, "clipping_range must be a finite number > 0"),
        ({"max_weight": -1}, "max_weight must be"),
        ({"timeout": 0}, "timeout must be"),
        ({"quantization_range": 2.0**22}, "quantization_range must be an int"),
        ({"quantization_range": 2**31}, "quantization_range must be an int"),
        ({"modulus_range": 3 * 2**30}, "power of two"),
        ({"modulus_range": 2**33}, "modulus_range must be in"),
        ({"modulus_range": 2**23}, "modulus_range must be in"),
    ],
)
def test_bad_parameters_raise_config_error(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SecAggPlus(FedAvg(), **kwargs)


def test_quantize_must_be_a_known_width() -> None:
    with pytest.raises(ConfigError, match="quantize must be 0"):
        SecAggPlus(FedAvg(), quantize=4)


@pytest.mark.usefixtures("task_identity")
def test_unknown_width_in_the_round_config_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="quantize must be 0"):
        run_local_recorded(3, config_quantize=12)


def test_run_config_allows_quantize_with_secagg_but_not_8_bits_under_client_level_noise() -> None:
    assert RunConfig(quantize=8).secagg and RunConfig(quantize=16).quantize == 16
    client_dp = {"client_dp": "distributed", "client_clip_norm": 1.0, "client_noise_multiplier": 1.0}
    assert RunConfig(quantize=16, **client_dp).quantize == 16
    assert RunConfig(quantize=8, secagg=False, **client_dp).quantize == 8
    with pytest.raises(ConfigError, match="--quantize 16, or drop --quantize"):
        RunConfig(quantize=8, **client_dp)


def test_inner_must_be_a_message_api_strategy() -> None:
    with pytest.raises(ConfigError, match=r"flwr\.serverapp\.strategy\.Strategy"):
        SecAggPlus(object())  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_too_many_nodes_for_the_field_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="does not fit"):
        run_local(5, quantization_range=2**22, modulus_range=2**24)


