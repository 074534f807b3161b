"""The SecAgg+ test harness shared by ``test_secagg*.py``, ``test_secagg_auth.py`` and ``test_streaming.py``: the
clients' deterministic updates, the example-weighted reference with its protocol-derived tolerance
(``_tolerance``), and ``_LocalGrid``, which delivers messages to a ClientApp in this process through a protobuf
round trip (as the wire does), so dropout patterns at every stage run in milliseconds."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from fedshield.client.secaggplus import secaggplus_mod  # fedshield's port: signed keys, ChaCha20 masks
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedshield.client.app import packed_wire
from fedshield.client.secagg_mod import secagg_adapter_mod, secagg_wire_mod
from fedshield.compression import secagg_field
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

    ``narrow``: with fedshield's wire mods around Flower's (packed arrays, narrowed masked vectors), as fedshield's
    ClientApp runs them; without them the client sends Flower's int64 masked vectors (a client of an older
    fedshield, driven by a grid that does not pack).
    """
    app = ClientApp()
    mods = ([packed_wire, secagg_wire_mod, secaggplus_mod, secagg_adapter_mod] if narrow
            else [secaggplus_mod, secagg_adapter_mod])

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


