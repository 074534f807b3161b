"""``large_models.py --parts secagg-time``: SecAgg+ vs plain FedAvg round time at real model sizes, with the
protocol's cost split into key agreement, mask expansion and unmasking.

Real code paths, one process: the server is ``Strategy.start`` with fedshield's
:class:`~fedshield.strategies.secagg.SecAggPlus` around Flower's ``FedAvg`` (or plain ``FedAvg``); the clients are a
real ``ClientApp`` with fedshield's client mods (``secagg_wire_mod``, fedshield's port of Flower's
``secaggplus_mod``, ``secagg_adapter_mod``), exactly as ``fedshield client`` chains them. Between the two sits
:class:`LocalGrid`, a Grid that serialises every message to Flower's protobuf and back (the bytes a SuperLink
would carry) and runs the addressed client's app on it, one client after another, yielding each reply as it
comes (as fedshield's ``StreamingGrid`` does). Flower's simulation engine would run the same code in Ray actors,
where the per-function timers below could not be read; run in one process, a round's time is the sum of every
client's work plus the server's (the total CPU a round costs, not its latency with clients in parallel).

Clients do no training (each returns the global model plus a seeded random update), so the figures are the cost of
the aggregation protocol alone. Timers wrap the protocol's functions where the code looks them up:

* key agreement: key-pair generation, ECDH + HKDF shared keys, Shamir splitting, share encryption/decryption
  (clients, all stages);
* mask expansion: the clients' ChaCha20 masks (``expand_mask``: one self mask and one per neighbour) and their
  addition, plus quantisation into the field;
* unmasking: the server's secret reconstruction and mask removal (``remove_masks``) and decoding;
* fold: the server's running field sum (``FieldSum.add``).

Each stage's wall time (server sends to last reply handled) is reported too.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

COST: dict[str, float] = defaultdict(float)
STAGES: dict[str, float] = defaultdict(float)
_PATCHED: list[tuple[Any, str, Any]] = []


def _timed(category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            COST[category] += time.perf_counter() - start
    return wrapper


def instrument() -> None:
    """Wrap the protocol's functions (once) in the modules that call them."""
    if _PATCHED:
        return
    import fedshield.client.secaggplus as client
    import fedshield.strategies._secagg_fold as fold
    import fedshield.strategies.secagg as server

    plan = [(client, n, "key agreement") for n in ("generate_key_pairs", "generate_shared_key", "create_shares",
                                                   "encrypt", "decrypt")]
    plan += [(client, "expand_mask", "mask expansion"), (client, "parameters_addition", "mask expansion"),
             (client, "parameters_subtraction", "mask expansion"), (client, "quantize", "mask expansion")]
    plan += [(server, "remove_masks", "unmasking"), (server, "weighted_average", "unmasking")]
    for module, name, category in plan:
        original = getattr(module, name)
        _PATCHED.append((module, name, original))
        setattr(module, name, _timed(category, original))
    fold.FieldSum.add = _timed("fold", fold.FieldSum.add)  # type: ignore[method-assign]


class LocalGrid:
    """A Flower Grid in one process: each message crosses Flower's protobuf serialisation both ways."""

    def __init__(self, app: Any, num_nodes: int) -> None:
        from flwr.app import Context, RecordDict

        self.app = app
        self.ids = list(range(1, num_nodes + 1))
        self.contexts = {nid: Context(run_id=1, node_id=nid, node_config={"partition-id": i, "num-partitions": num_nodes},
                                      state=RecordDict(), run_config={}) for i, nid in enumerate(self.ids)}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.ids)

    def create_message(self, content: Any, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Any:
        from flwr.app import Message

        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterator[Any]:
        return self._replies(list(messages))

    def _replies(self, messages: list[Any]) -> Iterator[Any]:
        if not messages:  # e.g. the evaluation Strategy.start asks for with fraction_evaluate 0
            return
        from flwr.common.serde import message_from_proto, message_to_proto
        from flwr.proto.message_pb2 import Message as ProtoMessage

        from fedshield.flower_internals.secagg import RECORD_KEY_CONFIGS, Key

        start = time.perf_counter()
        stage = "train"
        for msg in messages:
            if RECORD_KEY_CONFIGS in msg.content.config_records:
                stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "train"))
            wire = ProtoMessage.FromString(message_to_proto(msg).SerializeToString())
            reply = self.app(message_from_proto(wire), self.contexts[msg.metadata.dst_node_id])
            back = ProtoMessage.FromString(message_to_proto(reply).SerializeToString())
            del wire, reply
            yield message_from_proto(back)
        STAGES[stage] += time.perf_counter() - start


def _initial(params: int) -> Any:
    from flwr.app import Array, ArrayRecord

    rng = np.random.default_rng(0)
    return ArrayRecord({"w": Array(rng.normal(0, 0.05, size=(params - 10,)).astype(np.float32)),
                        "b": Array(np.zeros(10, dtype=np.float32))})


def _client_app(secagg: bool) -> Any:
    from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from fedshield.client.secagg_mod import secagg_adapter_mod, secagg_wire_mod
    from fedshield.client.secaggplus import secaggplus_mod
    from fedshield.protocol import ARRAYS, METRICS, NUM_EXAMPLES

    app = ClientApp()

    @app.train(mods=[secagg_wire_mod, secaggplus_mod, secagg_adapter_mod] if secagg else [])
    def train(msg: Message, context: Context) -> Message:
        rng = np.random.default_rng(int(context.node_config["partition-id"]))
        glob = msg.content.array_records[ARRAYS]
        local = {k: Array((a.numpy() + rng.normal(0, 0.01, size=a.shape)).astype(np.float32)) for k, a in glob.items()}
        return Message(RecordDict({ARRAYS: ArrayRecord(local), METRICS: MetricRecord({NUM_EXAMPLES: 100})}),
                       reply_to=msg)

    return app


def one_run(secagg: bool, clients: int, params: int, rounds: int) -> tuple[list[dict[str, float]], np.ndarray]:
    """Run ``rounds`` rounds; per round its wall time, each stage's and each cost category's seconds; and the
    final global model (flat), which SecAgg+ must give as plain FedAvg does, up to its quantisation."""
    from flwr.serverapp.strategy import FedAvg

    from fedshield.strategies.secagg import SecAggPlus

    instrument()
    strategy: Any = FedAvg(fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
    if secagg:
        strategy = SecAggPlus(strategy, timeout=600)
    grid = LocalGrid(_client_app(secagg), clients)
    out: list[dict[str, float]] = []
    mark = [time.perf_counter()]

    def stamp(_rnd: int, _arrays: Any) -> None:
        now = time.perf_counter()
        if _rnd > 0:
            out.append({"round_s": now - mark[0], **{f"stage {k}": v for k, v in STAGES.items()}, **COST})
        STAGES.clear()
        COST.clear()
        mark[0] = time.perf_counter()

    result = strategy.start(grid=grid, initial_arrays=_initial(params), num_rounds=rounds, evaluate_fn=stamp)
    if len(out) != rounds:
        raise RuntimeError(f"expected {rounds} rounds, got {len(out)}: the run failed")
    return out, np.concatenate([a.numpy().ravel() for a in result.arrays.values()])


def run_secagg_time(clients: list[int], sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # as a ServerApp process has them
    logging.getLogger("flwr").setLevel(logging.WARNING)
    one_run(True, 3, 100, 1)  # imports and first-call costs out of the figures
    rows = []
    for params in sizes:
        for n in clients:
            plain, plain_model = one_run(False, n, params, rounds)
            sec, sec_model = one_run(True, n, params, rounds)
            gap = float(np.max(np.abs(plain_model - sec_model)))
            if not gap < 1e-4:  # quantisation: 16 / 2**22 per client value, far below this
                raise RuntimeError(f"SecAgg+ and plain FedAvg ended {gap:g} apart: a round was not aggregated")
            rows.append(_row(n, params, plain, sec))
    return rows


def _row(n: int, params: int, plain: list[dict[str, float]], sec: list[dict[str, float]]) -> dict[str, Any]:
    p = statistics.median(r["round_s"] for r in plain)
    keys = sorted({k for r in sec for k in r if k != "round_s"})
    split = {k: statistics.median(r.get(k, 0.0) for r in sec) for k in keys}
    s = statistics.median(r["round_s"] for r in sec)
    print(f"secagg round time {n} clients x {params:,}: plain {p:.2f} s  SecAgg+ {s:.2f} s  ratio {s / p:.2f}  "
          + "  ".join(f"{k} {v:.2f}" for k, v in split.items()), flush=True)
    return {"name": f"SecAgg+ vs plain round time {n}x{params}", "ours": s, "baseline": p, "unit": "s/round",
            "ratio": s / p, "detail": {"better": "lower", "clients": n, "params": params, "split_s": split,
                                       "rounds": len(sec), "plain_rounds_s": [r["round_s"] for r in plain],
                                       "secagg_rounds_s": [r["round_s"] for r in sec],
                                       "how": "one process, LocalGrid (protobuf both ways), clients in turn"}}
