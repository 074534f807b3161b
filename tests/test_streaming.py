"""Streaming aggregation: StreamingFedAvg against Flower's FedAvg, replies freed as they are folded, and the
server's wrapper chain streaming replies through a StreamingGrid (SecAgg+ stages read once, outcomes counted once)."""

from __future__ import annotations

import gc
import time
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from fedshield.config import RunConfig
from fedshield.protocol import ARRAYS, METRICS, NUM_EXAMPLES, ClientReply
from fedshield.server.round_row import outcome_counts as _outcome_counts
from fedshield.strategies.offset import RoundOffset
from fedshield.strategies.recording import RecordingStrategy
from fedshield.strategies.stack import build_strategy
from fedshield.strategies.streaming import StreamingFedAvg, StreamingGrid, WeightedSum
from fedshield.strategies.validation import REJECTED

from _strategy_rounds import SHAPES, as_numpy, client_models, configure, global_model, reply, weighted_mean


# --- streaming FedAvg -----------------------------------------------------------------------------------------


def _mixed_replies(messages: list[Message], rng: np.random.Generator) -> list[Message]:
    out = []
    for i, msg in enumerate(messages):
        model = {"f32": rng.normal(size=(5, 3)).astype(np.float32), "f64": rng.normal(size=7),
                 "zero_d": np.asarray(rng.normal(), dtype=np.float32), "count": np.asarray([i, 2 * i], dtype=np.int64),
                 "empty": np.zeros((0,), dtype=np.float32)}
        out.append(reply(msg, model, float(rng.integers(1, 500)), accuracy=float(rng.random())))
    return out


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("seed", range(5))
def test_streaming_fedavg_equals_flower_fedavg(seed: int) -> None:
    rng = np.random.default_rng(seed)
    messages = configure(FedAvg(min_available_nodes=9, min_train_nodes=9), 9)
    replies = _mixed_replies(messages, rng)
    ours_arrays, ours_metrics = StreamingFedAvg().aggregate_train(1, iter(replies))
    flower_arrays, flower_metrics = FedAvg().aggregate_train(1, replies)
    assert ours_arrays is not None and flower_arrays is not None
    assert list(ours_arrays) == list(flower_arrays)
    for key in flower_arrays:
        a, b = ours_arrays[key].numpy(), flower_arrays[key].numpy()
        assert a.shape == b.shape and a.dtype == b.dtype, key
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=key)
    assert dict(ours_metrics) == pytest.approx(dict(flower_metrics))


@pytest.mark.usefixtures("task_identity")
def test_streaming_skips_errors_and_raises_like_flower_on_inconsistent_replies() -> None:
    messages = configure(FedAvg(min_available_nodes=3, min_train_nodes=3), 3)
    models = client_models(3)
    good = [reply(m, x, 1.0) for m, x in zip(messages, models)]
    failed = Message(Error(code=1, reason="boom"), reply_to=messages[0])
    arrays, _ = StreamingFedAvg().aggregate_train(1, [failed, *good[1:]])
    np.testing.assert_allclose(as_numpy(arrays)["w"], weighted_mean(models[1:], [1, 1])["w"], rtol=1e-6)
    assert StreamingFedAvg().aggregate_train(1, [failed]) == (None, None)
    odd = reply(messages[2], {**models[2], "extra": np.zeros(1)}, 1.0)
    for strategy in (FedAvg(), StreamingFedAvg()):
        with pytest.raises(InconsistentMessageReplies):
            strategy.aggregate_train(1, [good[0], good[1], odd])


@pytest.mark.usefixtures("task_identity")
def test_single_reply_comes_back_bit_exact() -> None:
    msg = configure(FedAvg(min_available_nodes=1, min_train_nodes=1), 1)[0]
    model = client_models(1)[0]
    arrays, _ = StreamingFedAvg().aggregate_train(1, [reply(msg, model, 37.0)])
    for key, value in model.items():
        np.testing.assert_array_equal(arrays[key].numpy(), value)


@pytest.mark.usefixtures("task_identity")
def test_streaming_fold_drops_each_reply_after_folding_it() -> None:
    """Fed a generator, the fold keeps at most one reply alive: the server's copies are freed as it goes."""
    messages = configure(FedAvg(min_available_nodes=8, min_train_nodes=8), 8)  # each reply runs a gc.collect
    alive: set[int] = set()
    peak = 0

    def arriving() -> Iterator[Message]:
        nonlocal peak
        for i, msg in enumerate(messages):
            r = reply(msg, {"w": np.full((256, 256), float(i), dtype=np.float32)}, 1.0)
            alive.add(i)
            weakref.finalize(r, alive.discard, i)
            gc.collect()
            peak = max(peak, len(alive))
            yield r
            del r

    arrays, _ = StreamingFedAvg().aggregate_train(1, arriving())
    assert peak <= 2, f"{peak} replies alive at once"
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((256, 256), 3.5, dtype=np.float32))


def test_weighted_sum_refuses_zero_total_weight() -> None:
    fold = WeightedSum()
    fold.add(ArrayRecord({"a": Array(np.ones(2))}), 0.0)
    with pytest.raises(ZeroDivisionError):
        fold.average()


@pytest.mark.usefixtures("task_identity")
def test_streaming_grid_yields_replies_as_they_arrive() -> None:
    """True streaming within the Strategy API: push at once, pull while the aggregation iterates."""
    messages = configure(FedAvg(min_available_nodes=4, min_train_nodes=4), 4)
    models = client_models(4)

    class SlowGrid:
        def __init__(self) -> None:
            self.pushed: list[Message] = []
            self.pulls = 0

        def push_messages(self, msgs: Any) -> list[str]:
            self.pushed = list(msgs)
            return [m.metadata.message_id for m in self.pushed]

        def pull_messages(self, ids: Any) -> list[Message]:
            self.pulls += 1  # one new reply per pull
            idx = len(self.pushed) - len(set(ids))
            m = self.pushed[idx]
            return [reply(m, models[idx], 1.0)]

    inner = SlowGrid()
    grid = StreamingGrid(inner, pull_interval=0.0)  # type: ignore[arg-type]
    stream = grid.send_and_receive(messages, timeout=10)
    assert len(inner.pushed) == 4 and inner.pulls == 0  # pushed eagerly, nothing pulled yet
    first = next(iter(stream))
    assert inner.pulls == 1 and first.metadata.src_node_id == messages[0].metadata.dst_node_id
    arrays, _ = StreamingFedAvg().aggregate_train(1, stream)  # the remaining three
    np.testing.assert_allclose(as_numpy(arrays)["w"], weighted_mean(models[1:], [1, 1, 1])["w"], rtol=1e-6)


class ArrivingGrid:
    """A Grid stand-in whose clients answer as the server pulls: each pull builds the next ``per_pull`` replies
    (so a reply exists only from its arrival on) and counts how many train replies' ArrayRecords are alive."""

    ERROR, NAN = 3, 5  # client indices: an error reply, and an update with a NaN (rejected)

    def __init__(self, n: int, *, per_pull: int = 1) -> None:
        self.ids = [1000 + 37 * i for i in range(n)]
        self.per_pull = per_pull
        self.sent: dict[int, Message] = {}  # train instructions by node: to rebuild the replies for Flower
        self.pending: list[Message] = []
        self.alive: set[int] = set()
        self.peak = 0

    def get_node_ids(self) -> list[int]:
        return list(self.ids)

    def push_messages(self, messages: Any) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            if msg.metadata.message_type == "train":
                self.sent[msg.metadata.dst_node_id] = msg
            self.pending.append(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Any) -> list[Message]:
        wanted = set(message_ids)
        batch = [m for m in self.pending if m.metadata.message_id in wanted][: self.per_pull]
        taken = {m.metadata.message_id for m in batch}
        self.pending = [m for m in self.pending if m.metadata.message_id not in taken]
        if any(m.metadata.message_type == "train" for m in batch):
            gc.collect()  # whatever the server let go of is gone now: only what it still holds is counted
        replies = [self.answer(m) for m in batch]
        self.peak = max(self.peak, len(self.alive))
        return replies

    def model(self, i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(100 + i)
        return {k: np.asarray(v + rng.normal(size=v.shape)).astype(v.dtype) for k, v in global_model().items()}

    def train_reply(self, msg: Message) -> Message:
        i = self.ids.index(msg.metadata.dst_node_id)
        model = self.model(i)
        if i == self.NAN:
            model["w"][0, 0] = np.nan
        return reply(msg, model, float(10 + 7 * i), accuracy=i / 100)

    def answer(self, msg: Message) -> Message:
        i = self.ids.index(msg.metadata.dst_node_id)
        if msg.metadata.message_type != "train":
            return Message(RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 5.0, "loss": 0.5, "accuracy": 0.9})}),
                           reply_to=msg)
        if i == self.ERROR:
            return Message(Error(code=1, reason="client crashed"), reply_to=msg)
        out = self.train_reply(msg)
        record = out.content[ARRAYS]
        self.alive.add(i)
        weakref.finalize(record, self.alive.discard, i)
        return out


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("per_pull", [1, 4])
def test_server_stack_aggregates_replies_one_at_a_time_and_equals_flower(per_pull: int) -> None:
    """The wrapper chain run_server builds for fedavg, driven by Flower's own Strategy.start through a
    StreamingGrid, keeps no more replies alive than one pull brought in (the server lets each go before the
    next pull), not N; and gives Flower's FedAvg result. (12 clients: every pull runs a full gc.collect.)"""
    n = 12
    strategy = build_strategy(RunConfig(num_clients=n, num_rounds=1, secagg=False, dp=False)).top
    inner = ArrivingGrid(n, per_pull=per_pull)
    result = RoundOffset(strategy, 0).start(
        grid=StreamingGrid(inner, pull_interval=0.0),  # type: ignore[arg-type]
        initial_arrays=ArrayRecord({k: Array(v) for k, v in global_model().items()}), num_rounds=1,
        train_config=ConfigRecord({"lr": 0.1}), evaluate_config=ConfigRecord({"lr": 0.1}),
    )
    assert inner.peak <= per_pull, f"{inner.peak} replies alive at once out of {n}"
    good = [m for nid, m in sorted(inner.sent.items()) if inner.ids.index(nid) not in (inner.ERROR, inner.NAN)]
    flower_arrays, flower_metrics = FedAvg().aggregate_train(1, [inner.train_reply(m) for m in good])
    assert list(result.arrays) == list(flower_arrays)
    for key in flower_arrays:
        a, b = result.arrays[key].numpy(), flower_arrays[key].numpy()
        assert a.shape == b.shape and a.dtype == b.dtype, key
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, err_msg=key)
    assert dict(strategy.last_train_metrics) == pytest.approx(dict(flower_metrics))
    outcomes = {inner.ids.index(r.node_id): r for r in strategy.last_replies}
    assert len(outcomes) == n and sum(r.ok for r in outcomes.values()) == n - 2
    assert outcomes[inner.ERROR].error == "client crashed"
    assert outcomes[inner.NAN].error.startswith(f"{REJECTED}: 'w' holds 1 non-finite value")
    assert len(strategy.last_bytes_up) == n - 1  # every update that came in, the rejected one too
    assert strategy.last_evaluate is not None and strategy.last_evaluate["accuracy"] == pytest.approx(0.9)
    counts = _outcome_counts(strategy.last_replies)
    assert (counts["clients_refused"], counts["clients_rejected"], counts["clients_failed"]) == (0, 1, 1)
    assert counts["rejected"] == [{"node_id": inner.ids[inner.NAN], "reason": "'w' holds 1 non-finite value(s) "
                                   "(NaN or infinity)"}]


@pytest.mark.usefixtures("task_identity")
def test_client_dp_chain_streams_too() -> None:
    n = 10
    strategy = build_strategy(RunConfig(num_clients=n, secagg=False, dp=False, client_dp="central",
                                        client_clip_norm=1.0, client_noise_multiplier=1.0)).top
    inner = ArrivingGrid(n)
    result = RoundOffset(strategy, 0).start(
        grid=StreamingGrid(inner, pull_interval=0.0),  # type: ignore[arg-type]
        initial_arrays=ArrayRecord({k: Array(v) for k, v in global_model().items()}), num_rounds=1,
    )
    assert inner.peak <= 2, f"{inner.peak} replies alive at once out of {n}"  # ClientLevelDP's loop keeps one
    assert set(result.arrays) == set(SHAPES) and sum(r.ok for r in strategy.last_replies) == n - 2


@pytest.mark.usefixtures("task_identity")
def test_secagg_chain_reads_every_stage_once_from_a_one_shot_iterator() -> None:
    """run_server's chain with SecAgg+ behind a grid whose replies can be read once (as StreamingGrid's): the
    SETUP, SHARE_KEYS, masked-vector and UNMASK stages each consume theirs in one pass, and the model is right."""
    from _secagg_harness import _LocalGrid, assert_weighted_average, initial_arrays, make_client_app
    from _secagg_harness import as_numpy as numpy_of

    class OneShotGrid(_LocalGrid):
        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> Iterator[Message]:
            return iter(list(super().send_and_receive(messages, timeout=timeout)))

    stack = build_strategy(RunConfig(num_clients=4, secagg=True, dp=False))
    strategy, named = stack.top, stack.stateful["strategy"]
    assert isinstance(named, FedAvg)
    named.fraction_evaluate = 0.0  # the in-process grid speaks SecAgg+ only
    models: list[dict[str, np.ndarray]] = []
    RoundOffset(strategy, 0).start(grid=OneShotGrid(make_client_app(), 4), initial_arrays=initial_arrays(),
                                   num_rounds=2, evaluate_fn=lambda _r, arrays: models.append(numpy_of(arrays)))
    assert_weighted_average(models[1], models[2], [0, 1, 2, 3], 2)
    assert [r.ok for r in strategy.last_replies] == [True] * 4 and len(strategy.last_bytes_up) == 4


def test_outcome_columns_count_each_client_once() -> None:
    replies = [ClientReply(1), ClientReply(2, error=f"{REJECTED}: update norm 9 exceeds max-update-norm 5"),
               ClientReply(3, error="fedshield:budget-exhausted: spent"), ClientReply(4, error="timed out"),
               ClientReply(5, error="")]
    assert _outcome_counts(replies) == {
        "clients_refused": 1, "clients_rejected": 1, "clients_failed": 2,
        "rejected": [{"node_id": 2, "reason": "update norm 9 exceeds max-update-norm 5"}],
    }


@pytest.mark.usefixtures("task_identity")
def test_streaming_grid_timeout_runs_from_the_push() -> None:
    class Silent:
        pulls = 0

        def push_messages(self, msgs: Any) -> list[str]:
            return ["a", "b"]

        def pull_messages(self, ids: Any) -> list[Message]:
            self.pulls += 1
            return []

    inner = Silent()
    stream = StreamingGrid(inner, pull_interval=0.0).send_and_receive([], timeout=0.01)  # type: ignore[arg-type]
    time.sleep(0.05)
    assert list(stream) == [] and inner.pulls == 0
    with pytest.raises(ValueError, match="pull_interval"):
        StreamingGrid(inner, pull_interval=-1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quick_window"):
        StreamingGrid(inner, quick_window=float("inf"))  # type: ignore[arg-type]


@pytest.mark.usefixtures("task_identity")
def test_streaming_grid_pulls_quickly_after_the_push_and_after_each_reply_then_at_its_interval() -> None:
    """The waits between pulls: ``quick_interval`` for ``quick_window`` after the push, then ``pull_interval``, and
    quick again after a reply arrives (the next one of a short stage is likely soon)."""
    quick, slow, window = 0.01, 0.03, 0.12
    messages = configure(FedAvg(min_available_nodes=2, min_train_nodes=2), 2)
    model = client_models(1)[0]

    class Late:
        def __init__(self) -> None:
            self.waits: list[float] = []
            self.first_reply_after: int | None = None  # how many waits came before the first reply

        def push_messages(self, msgs: Any) -> list[str]:
            self.pushed, self.pushed_at = list(msgs), time.monotonic()
            return [m.metadata.message_id for m in self.pushed]

        def pull_messages(self, ids: Any) -> list[Message]:
            if self.first_reply_after is None:  # the first node answers once the quick window has passed
                if time.monotonic() - self.pushed_at <= 2 * window:
                    return []
                self.first_reply_after = len(self.waits)
                return [reply(self.pushed[0], model, 1.0)]
            if len(self.waits) < self.first_reply_after + 3:
                return []
            return [reply(self.pushed[1], model, 1.0)]

        def wait_for_replies(self, seconds: float) -> None:
            self.waits.append(seconds)
            time.sleep(seconds)

    inner = Late()
    grid = StreamingGrid(inner, pull_interval=slow, quick_interval=quick, quick_window=window)  # type: ignore[arg-type]
    assert len(list(grid.send_and_receive(messages, timeout=30))) == 2
    waits, n = inner.waits, inner.first_reply_after
    assert n is not None and waits[0] == quick and waits[n - 1] == slow  # quick after the push, then the interval
    assert waits[n:] == [quick] * 3  # quick again after the first reply


@pytest.mark.usefixtures("task_identity")
def test_recording_lists_evaluate_replies_for_an_inner_that_reads_them_twice() -> None:
    class TwiceFedAvg(FedAvg):
        def aggregate_evaluate(self, server_round: int, replies: Any) -> MetricRecord | None:
            assert len(list(replies)) == len(list(replies)) == 2
            return super().aggregate_evaluate(server_round, replies)

    messages = configure(FedAvg(min_available_nodes=2, min_train_nodes=2), 2)
    replies = [Message(RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: 1.0, "accuracy": a})}), reply_to=m)
               for m, a in zip(messages, (0.2, 0.4))]
    metrics = RecordingStrategy(TwiceFedAvg()).aggregate_evaluate(1, iter(replies))
    assert metrics is not None and metrics["accuracy"] == pytest.approx(0.3)


