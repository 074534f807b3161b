"""SecAgg+ on the Message API: fedshield's SecAggPlus strategy with fedshield's port of ``secaggplus_mod`` on clients.

Two harnesses:

* ``_LocalGrid`` delivers messages to a ClientApp in this process through a protobuf round trip (as the wire
  does), so dropout patterns at every stage run in milliseconds;
* Flower's real simulation engine (Ray) for the end-to-end checks, with hygiene checks on what it leaves behind.

The reference is the plain example-weighted average of the same client updates, computed here with numpy. The
tolerance follows from the protocol's arithmetic (see ``_tolerance``), not from a constant: for the full-precision
field and for the fields sized for 8- and 16-bit updates (``quantize``) alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from fedshield.client.secaggplus import secaggplus_mod  # fedshield's port: signed keys, ChaCha20 masks
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedshield.client.secagg_mod import CLEAR_METRICS, secagg_adapter_mod, secagg_wire_mod, to_fitres_content
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
    TRAIN_LOSS,
    ClientReply,
)
from fedshield.strategies.outcomes import RoundOutcomes
from fedshield.strategies.recording import RecordingStrategy
from fedshield.strategies.secagg import DEFAULT_CLIPPING_RANGE, SecAggPlus

CLIP, LEVELS = 8.0, 2**22  # SecAggPlus defaults, restated for the tolerance
MAX_WEIGHT = 1000.0

# --- the model and the clients' deterministic updates ----------------------------------------------------------

SHAPES: dict[str, tuple[tuple[int, ...], type]] = {
    "conv.weight": ((4, 3, 3), np.float32),
    "conv.bias": ((4,), np.float32),
    "fc.weight": ((64, 64), np.float32),  # large enough that payload, not array headers, dominates the bytes
    "scale": ((), np.float64),  # 0-d: in-place numpy rebinds these instead of mutating
    "empty": ((0,), np.float32),
    "bn.num_batches_tracked": ((), np.int64),  # integer buffer: each client adds exactly 1
}


def initial_arrays() -> ArrayRecord:
    rng = np.random.default_rng(7)
    return ArrayRecord(
        {k: Array(np.asarray(rng.normal(size=shape)).astype(dtype)) for k, (shape, dtype) in SHAPES.items()}
    )


def num_examples(partition: int) -> int:
    return 100 + 37 * partition


def update(partition: int, server_round: int) -> dict[str, np.ndarray[Any, Any]]:
    """Client ``partition``'s update in ``server_round``: bounded by 0.5, far inside the clipping range."""
    rng = np.random.default_rng([partition, server_round])
    out = {k: rng.uniform(-0.5, 0.5, size=shape) for k, (shape, _) in SHAPES.items()}
    out["bn.num_batches_tracked"] = np.asarray(1.0)
    return out


def make_client_app(refusing_partition: int | None = None, *, narrow: bool = True) -> ClientApp:
    """A ClientApp whose train handler returns global + update(partition, round), or refuses.

    ``narrow``: with fedshield's wire mod around Flower's, as fedshield's ClientApp runs them; without it the
    client sends Flower's int64 masked vectors (a client of an older fedshield).
    """
    app = ClientApp()
    mods = [secagg_wire_mod, secaggplus_mod, secagg_adapter_mod] if narrow else [secaggplus_mod, secagg_adapter_mod]

    @app.train(mods=mods)
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        if pid in (refusing_partition, msg.content["config"].get("refusing", -1)):
            raise RuntimeError(f"{BUDGET_REFUSAL} test")
        if msg.content["config"].get("quantize", 0):
            raise RuntimeError("under SecAgg+ the client must be told quantize 0: the field quantizes")
        rnd = int(msg.content["config"]["server-round"])  # type: ignore[arg-type]
        glob, upd = msg.content.array_records[ARRAYS], update(pid, rnd)
        local = {k: Array(np.asarray(a.numpy() + upd[k]).astype(a.numpy().dtype)) for k, a in glob.items()}
        metrics: dict[str, Any] = {NUM_EXAMPLES: num_examples(pid), EPSILON: 0.5 * rnd, TRAIN_LOSS: 1.25,
                                   PARTITION_ID: pid}
        return Message(RecordDict({ARRAYS: ArrayRecord(local), METRICS: MetricRecord(metrics)}), reply_to=msg)

    return app


# --- the reference and its tolerance -------------------------------------------------------------------------


def _tolerance(
    partitions: list[int], server_round: int, dtype: np.dtype[Any], scale: float, clip: float, levels: int
) -> float:
    """Largest deviation SecAgg+ may show from the exact weighted average, per entry.

    Each client scales its update by q_i / T (q_i = round(n_i / max_weight * T), T = ``levels``) and
    stochastically rounds it to a grid of step 2c/T (c = ``clip``): error < 1 step per client, so < N steps on the
    sum, which the server divides by Q / T = sum(q_i) / T. Weighting by q_i instead of n_i moves the average by at
    most N / Q * max|update| (|q_i - n_i T / max_weight| <= 1/2). Then the float cast of the new global: one ulp at
    ``scale``. No clipping term: every test update times n_i / max_weight stays inside +-c (checked).
    """
    n = len(partitions)
    q_total = sum(round(num_examples(p) / MAX_WEIGHT * levels) for p in partitions)
    updates = [a for p in partitions for a in update(p, server_round).values() if a.size]
    largest = max(float(np.max(np.abs(a))) for a in updates)
    assert largest * max(num_examples(p) for p in partitions) / MAX_WEIGHT < clip, "the bound assumes no clipping"
    return n * (2 * clip) / q_total + n / q_total * largest + float(np.finfo(dtype).eps) * scale


def field(bits: int, num_nodes: int) -> tuple[float, int]:
    """``(clipping range, levels)`` SecAggPlus uses for ``bits`` per value (0: the full-precision field)."""
    return (DEFAULT_CLIPPING_RANGE[bits], secagg_field(bits, num_nodes)[0]) if bits else (CLIP, LEVELS)


def assert_weighted_average(
    before: dict[str, np.ndarray[Any, Any]], after: dict[str, np.ndarray[Any, Any]], partitions: list[int], rnd: int,
    *, clip: float = CLIP, levels: int = LEVELS,
) -> None:
    weights = np.array([num_examples(p) for p in partitions], dtype=np.float64)
    assert list(after) == list(before), "SecAgg+ must keep the global model's keys and order"
    for key, old in before.items():
        updates = np.stack([update(p, rnd)[key] for p in partitions])
        expected = old + np.tensordot(weights / weights.sum(), updates, axes=1)
        got = after[key]
        assert got.shape == old.shape, key
        if np.issubdtype(old.dtype, np.integer):
            # Flower's FedAvg returns integer arrays as float64 (it multiplies by the weight), with or without
            # SecAgg+; the value must still be the exact integer.
            np.testing.assert_array_equal(got, np.rint(expected), err_msg=key)
            continue
        assert got.dtype == old.dtype, key
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
        tol = _tolerance(partitions, rnd, old.dtype, scale, clip, levels)
        np.testing.assert_allclose(got, expected, rtol=0, atol=tol, err_msg=key)


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray[Any, Any]]:
    return {k: a.numpy() for k, a in record.items()}


def ok_partitions(replies: list[ClientReply]) -> list[int]:
    return sorted(int(r.metrics[PARTITION_ID]) for r in replies if r.ok)


# --- in-process grid ------------------------------------------------------------------------------------------

Fault = Callable[[int, str], str | None]  # (partition, stage) -> None, "timeout", "malformed", an error reason


class _LocalGrid(Grid):
    """Runs a ClientApp per node in this process; messages cross a protobuf round trip like on the wire."""

    def __init__(self, app: ClientApp, num_nodes: int, fault: Fault | None = None) -> None:
        self._app, self._fault = app, fault or (lambda _p, _s: None)
        #: Each masked vector as it crossed the wire: one list of arrays per stage-2 reply.
        self.masked: list[list[np.ndarray[Any, Any]]] = []
        self.node_ids = [1_000_003 * (i + 1) % 7_919_993 for i in range(num_nodes)]  # unordered, like real ids
        self.contexts = {
            nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": num_nodes},
                         state=RecordDict(), run_config={})
            for i, nid in enumerate(self.node_ids)
        }

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover - not used
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover - not used
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover - not used
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover - not used
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            reply = self._deliver(_wire(msg))
            if reply is not None:
                replies.append(_wire(reply))
                self._note_masked(replies[-1])
        return replies

    def _note_masked(self, reply: Message) -> None:
        rec = reply.content.config_records.get(RECORD_KEY_CONFIGS) if not reply.has_error() else None
        if rec is not None and Key.MASKED_PARAMETERS in rec:
            self.masked.append([bytes_to_ndarray(b) for b in rec[Key.MASKED_PARAMETERS]])  # type: ignore[union-attr]

    def _deliver(self, msg: Message) -> Message | None:
        ctx = self.contexts[msg.metadata.dst_node_id]
        stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        fault = self._fault(int(ctx.node_config["partition-id"]), stage)
        if fault == "timeout":
            return None
        if fault == "malformed":  # a reply without the fields its stage needs
            return Message(RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({"junk": 1})}), reply_to=msg)
        if fault is not None:
            return Message(Error(code=2, reason=fault), reply_to=msg)
        try:
            return self._app(msg, ctx)
        except Exception as exc:  # as Flower's runtime does: an exception becomes an error reply
            return Message(Error(code=2, reason=f"{type(exc)}:<'{exc}'>"), reply_to=msg)


def _wire(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))



def run_local(
    num_nodes: int, num_rounds: int = 1, *, refusing: int | None = None, fault: Fault | None = None, **kw: Any
) -> tuple[list[dict[str, np.ndarray[Any, Any]]], list[list[ClientReply]]]:
    """Run ``num_rounds`` with Strategy.start; return the global model after each round and the replies."""
    grid = _LocalGrid(make_client_app(refusing), num_nodes, fault)
    strategy = SecAggPlus(FedAvg(fraction_evaluate=0.0, min_available_nodes=num_nodes), max_weight=MAX_WEIGHT, **kw)
    models: list[dict[str, np.ndarray[Any, Any]]] = []
    replies: list[list[ClientReply]] = []

    def record(rnd: int, arrays: ArrayRecord) -> None:
        models.append(as_numpy(arrays))
        if rnd:
            replies.append(list(strategy.last_replies))

    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=num_rounds, evaluate_fn=record)
    return models, replies


def run_local_recorded(
    num_nodes: int, num_rounds: int = 1, *, narrow: bool = True, config_quantize: int = 0,
    fault: Fault | None = None, **kw: Any,
) -> dict[str, Any]:
    """As :func:`run_local`, inside fedshield's RecordingStrategy, with ``config_quantize`` bits asked for by the
    round config (as fedshield's server does). Returns models, replies, the grid, and each round's ``bytes_up``."""
    grid = _LocalGrid(make_client_app(narrow=narrow), num_nodes, fault)
    inner = FedAvg(fraction_evaluate=0.0, min_available_nodes=num_nodes)
    outcomes = RoundOutcomes()  # shared, as build_strategy shares it: SecAgg+ writes who took part
    strategy = RecordingStrategy(SecAggPlus(inner, max_weight=MAX_WEIGHT, outcomes=outcomes, **kw), outcomes)
    out: dict[str, Any] = {"models": [], "replies": [], "bytes_up": [], "grid": grid}

    def record(rnd: int, arrays: ArrayRecord) -> None:
        out["models"].append(as_numpy(arrays))
        if rnd:
            out["replies"].append(list(strategy.last_replies))
            out["bytes_up"].append(list(strategy.last_bytes_up))

    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=num_rounds, evaluate_fn=record,
                   train_config=ConfigRecord({"quantize": config_quantize}))
    return out


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


# --- the real simulation engine -------------------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _zombie_free(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


#: The simulated runs of this module, all in ONE simulation (one Ray start): ``name -> (rounds, train config)``.
#: ``refusing`` names the partition that refuses to train; ``quantize`` is what the server asks for.
SIM_RUNS: dict[str, tuple[int, dict[str, int]]] = {
    "three_rounds": (3, {"quantize": 0}),
    "refusing": (2, {"quantize": 0, "refusing": 0}),
    "q8": (2, {"quantize": 8}),
    "q16": (2, {"quantize": 16}),
}
SIM_NODES = 5


def _run_strategy(grid: Grid, num_rounds: int, train_config: dict[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"models": [], "replies": [], "bytes_up": []}
    # min_train_nodes too: the ServerApp thread starts before the simulation registers its nodes, and FedAvg sizes
    # its sample from the nodes registered at that moment.
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=SIM_NODES, min_available_nodes=SIM_NODES)
    # Inside RecordingStrategy, as fedshield's server runs it: bytes_up is its metric.
    outcomes = RoundOutcomes()
    strategy = RecordingStrategy(SecAggPlus(inner, max_weight=MAX_WEIGHT, timeout=120, outcomes=outcomes), outcomes)

    def record(rnd: int, arrays: ArrayRecord) -> None:
        out["models"].append(as_numpy(arrays))
        if rnd:
            out["replies"].append(list(strategy.last_replies))
            out["bytes_up"].append(list(strategy.last_bytes_up))

    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=num_rounds, evaluate_fn=record,
                   timeout=120, train_config=ConfigRecord(train_config))
    return out


@pytest.fixture(scope="module")
def simulated() -> dict[str, dict[str, Any]]:
    """Every run of :data:`SIM_RUNS` in one simulation; fail if Ray processes, sessions or files outlive it."""
    import ray
    from flwr.simulation import run_simulation
    from flwr.supercore import telemetry

    before = _descendants(os.getpid())
    home = tempfile.mkdtemp(prefix="fs-flwr-home-")
    results: dict[str, dict[str, Any]] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLWR_HOME", home)
        mp.setattr(telemetry, "FLWR_TELEMETRY_ENABLED", "0")  # read at import; offline machines hang on it
        for key in ("source", "cluster", "partner"):  # or the telemetry thread writes FLWR_HOME/source
            mp.setitem(telemetry.state, key, "test")
        # RayBackend writes the driver's sys.path into PYTHONPATH; restored when the context exits.
        mp.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        app = ServerApp()

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            for name, (rounds, train_config) in SIM_RUNS.items():
                results[name] = _run_strategy(grid, rounds, train_config)

        ray_tmp = tempfile.mkdtemp(prefix="fsray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
        try:
            run_simulation(
                server_app=app, client_app=make_client_app(), num_supernodes=SIM_NODES,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"_temp_dir": ray_tmp, "include_dashboard": False, "num_cpus": 2},
                },
            )
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not ray.is_initialized(), "run_simulation must shut Ray down"
    deadline = time.monotonic() + 20
    while (left := _zombie_free(_descendants(os.getpid()) - before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    shutil.rmtree(home, ignore_errors=True)
    assert not left, f"simulation left processes behind: {sorted(left)}"
    assert set(results) == set(SIM_RUNS), f"runs that did not finish: {set(SIM_RUNS) - set(results)}"
    return results


@pytest.fixture(scope="module")
def three_rounds(simulated: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return simulated["three_rounds"]


def test_simulation_aggregate_equals_fedavg_of_the_same_updates(three_rounds: dict[str, Any]) -> None:
    models, replies = three_rounds["models"], three_rounds["replies"]
    assert ok_partitions(replies[0]) == [0, 1, 2, 3, 4]
    assert_weighted_average(models[0], models[1], [0, 1, 2, 3, 4], 1)


def test_simulation_runs_several_rounds(three_rounds: dict[str, Any]) -> None:
    models, replies = three_rounds["models"], three_rounds["replies"]
    assert len(models) == 4 and len(replies) == 3
    for rnd in (2, 3):
        assert ok_partitions(replies[rnd - 1]) == [0, 1, 2, 3, 4]
        assert_weighted_average(models[rnd - 1], models[rnd], [0, 1, 2, 3, 4], rnd)
        assert {r.metrics[EPSILON] for r in replies[rnd - 1]} == {0.5 * rnd}


def test_simulation_refusing_client_is_dropped_with_its_reason(simulated: dict[str, dict[str, Any]]) -> None:
    out = simulated["refusing"]
    for rnd in (1, 2):
        replies = out["replies"][rnd - 1]
        (refused,) = [r for r in replies if not r.ok]
        assert refused.error is not None and f"{BUDGET_REFUSAL} test" in refused.error
        assert ok_partitions(replies) == [1, 2, 3, 4]
        assert_weighted_average(out["models"][rnd - 1], out["models"][rnd], [1, 2, 3, 4], rnd)


@pytest.fixture(scope="module")
def quantized_runs(simulated: dict[str, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {bits: simulated[f"q{bits}"] for bits in (8, 16)}


@pytest.mark.parametrize("bits", [8, 16])
def test_simulation_quantized_aggregate_is_fedavg_within_the_field_bound(
    quantized_runs: dict[int, dict[str, Any]], bits: int
) -> None:
    out, (clip, levels) = quantized_runs[bits], field(bits, 5)
    for rnd in (1, 2):
        assert ok_partitions(out["replies"][rnd - 1]) == [0, 1, 2, 3, 4]
        assert_weighted_average(out["models"][rnd - 1], out["models"][rnd], [0, 1, 2, 3, 4], rnd,
                                clip=clip, levels=levels)


def test_simulation_eight_bit_bytes_per_client_at_most_0_55x_full_precision(
    quantized_runs: dict[int, dict[str, Any]], three_rounds: dict[str, Any]
) -> None:
    full = [b for rnd in three_rounds["bytes_up"] for b in rnd]
    for bits, limit in ((8, 0.55), (16, 1.0)):
        sent = [b for rnd in quantized_runs[bits]["bytes_up"] for b in rnd]
        assert len(sent) == 10 and max(sent) <= limit * min(full), (bits, sent, full)
