"""Strategies by name: the registry and its errors, composition checks, every aggregate against a numpy reference
on hand-made updates, streaming FedAvg against Flower's FedAvg, the server's wrapper chain streaming replies through
a StreamingGrid, update validation, and all 11 strategies end to end in one simulation."""

from __future__ import annotations

import gc
import inspect
import json
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import load_file
from scipy import stats

import flwr.serverapp.strategy as flwr_strategies
from fedshield.config import ROBUST_STRATEGIES, STRATEGIES, RunConfig, load_config_file
from fedshield.errors import ConfigError
from fedshield.protocol import ARRAYS, METRICS, NUM_EXAMPLES, ClientReply
from fedshield.server.round_row import outcome_counts as _outcome_counts
from fedshield.strategies.offset import RoundOffset
from fedshield.strategies.recording import RecordingStrategy
from fedshield.strategies.registry import Sampling, build, get_entry, strategy_names, validate_params
from fedshield.strategies.stack import build_strategy
from fedshield.strategies.streaming import StreamingFedAvg, StreamingGrid, WeightedSum
from fedshield.strategies.validation import REJECTED, UpdateValidation
from fedshield.tasks import get_task

from _grid import FakeGrid

# --- hand-made rounds ---------------------------------------------------------------------------------------

SHAPES = {"w": ((3, 4), np.float32), "b": ((4,), np.float32), "s": ((), np.float64)}




def global_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: np.asarray(rng.normal(size=shape)).astype(dtype) for k, (shape, dtype) in SHAPES.items()}


def client_models(n: int, seed: int = 1, spread: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    g = global_model()
    return [{k: np.asarray(v + spread * (i + 1) * rng.normal(size=v.shape)).astype(v.dtype) for k, v in g.items()}
            for i in range(n)]


def configure(strategy: Any, n: int, model: dict[str, np.ndarray] | None = None) -> list[Message]:
    arrays = ArrayRecord({k: Array(v) for k, v in (model or global_model()).items()})
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), FakeGrid(n)))
    for m in messages:
        m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return sorted(messages, key=lambda m: m.metadata.dst_node_id)


def reply(msg: Message, model: dict[str, np.ndarray], weight: float, **metrics: float) -> Message:
    content = RecordDict({ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in model.items()}),
                          METRICS: MetricRecord({NUM_EXAMPLES: weight, "train-loss": 1.0 + weight / 100, **metrics})})
    return Message(content, reply_to=msg)


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: a.numpy() for k, a in record.items()}


def weighted_mean(models: list[dict[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    return {k: np.tensordot(w, np.stack([m[k].astype(np.float64) for m in models]), axes=1) for k in models[0]}


def flat(model: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(model[k]).astype(np.float64) for k in SHAPES])


def krum_selection(models: list[dict[str, np.ndarray]], f: int, k: int) -> list[int]:
    """Blanchard et al. 2017: score = sum of squared distances to the n-f-2 nearest others; lowest k win."""
    x = np.stack([flat(m) for m in models])
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    closest = max(1, len(models) - f - 2)
    scores = [np.sort(np.delete(d[i], i))[:closest].sum() for i in range(len(models))]
    return list(np.argsort(scores)[:k])


def bulyan_reference(models: list[dict[str, np.ndarray]], f: int) -> dict[str, np.ndarray]:
    """El Mhamdi et al. 2018: Krum-select n-2f, then per coordinate the mean of the n-4f values nearest the median."""
    theta = len(models) - 2 * f
    chosen = [models[i] for i in krum_selection(models, f, theta)]
    beta = theta - 2 * f
    out = {}
    for key in SHAPES:
        stack = np.stack([m[key].astype(np.float64) for m in chosen])
        med = np.median(stack, axis=0)
        order = np.argsort(np.abs(stack - med), axis=0, kind="stable")[:beta]
        out[key] = np.take_along_axis(stack, order, axis=0).mean(axis=0)
    return out


def opt_reference(name: str, params: dict[str, float], g: dict[str, np.ndarray], avg: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reddi et al. 2021 (adaptive federated optimisation), first round, from zero moments."""
    out = {}
    for key in g:
        delta = avg[key] - g[key].astype(np.float64)
        if name == "fedavgm":
            out[key] = g[key] - params["server_learning_rate"] * (-delta)
            continue
        b1 = params.get("beta_1", 0.0)
        b2 = params.get("beta_2", 0.0)
        m = (1 - b1) * delta
        if name == "fedadam":
            v = (1 - b2) * delta**2
            eta = params["eta"] * np.sqrt(1 - b2**2) / (1 - b1**2)  # Flower's bias correction at round 1
        elif name == "fedyogi":
            v = (1 - b2) * delta**2  # v0 = 0: v1 = -(1-b2) d^2 sign(-d^2)
            eta = params["eta"]
        else:  # fedadagrad
            v = delta**2
            eta = params["eta"]
        out[key] = g[key] + eta * m / (np.sqrt(v) + params["tau"])
    return out


N = 7
WEIGHTS = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]
CASES: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedavgm": {"server_learning_rate": 0.5, "server_momentum": 0.9},
    "fedprox": {"proximal_mu": 0.3},
    "fedadam": {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.01},
    "fedyogi": {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 0.01},
    "fedadagrad": {"eta": 0.05, "tau": 0.01},
    "krum": {"num_malicious_nodes": 1},
    "multikrum": {"num_malicious_nodes": 1, "num_nodes_to_select": 3},
    "bulyan": {"num_malicious_nodes": 1},
    "fedmedian": {},
    "fedtrimmedavg": {"beta": 0.2},
}


def reference(name: str, params: dict[str, Any], models: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    g = global_model()
    if name in ("fedavg", "fedprox"):
        return weighted_mean(models, WEIGHTS)
    if name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        return opt_reference(name, params, g, weighted_mean(models, WEIGHTS))
    if name in ("krum", "multikrum"):
        picked = krum_selection(models, params["num_malicious_nodes"], params.get("num_nodes_to_select", 1))
        return weighted_mean([models[i] for i in picked], [WEIGHTS[i] for i in picked])
    if name == "bulyan":
        return bulyan_reference(models, params["num_malicious_nodes"])
    stack = {k: np.stack([m[k].astype(np.float64) for m in models]) for k in SHAPES}
    if name == "fedmedian":
        return {k: np.median(v, axis=0) for k, v in stack.items()}
    return {k: stats.trim_mean(v, params["beta"], axis=0) for k, v in stack.items()}


def sampling(n: int) -> Sampling:
    return Sampling(min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", STRATEGIES)
def test_aggregate_equals_numpy_reference(name: str) -> None:
    params = CASES[name]
    strategy = build(name, params, sampling=sampling(N))
    messages = configure(strategy, N)
    models = client_models(N)
    arrays, metrics = strategy.aggregate_train(1, [reply(m, x, w) for m, x, w in zip(messages, models, WEIGHTS)])
    assert arrays is not None and metrics is not None
    got, want = as_numpy(arrays), reference(name, params, models)
    assert list(got) == list(SHAPES)
    for key, (shape, _) in SHAPES.items():
        assert got[key].shape == shape, key  # 0-d stays 0-d
        np.testing.assert_allclose(got[key], want[key], rtol=2e-6, atol=2e-6, err_msg=f"{name}:{key}")


def test_registry_matches_config_and_flower_signatures() -> None:
    assert strategy_names() == STRATEGIES
    assert set(ROBUST_STRATEGIES) == {n for n in STRATEGIES if get_entry(n).robust}
    for name in STRATEGIES:
        entry = get_entry(name)
        cls = entry.strategy_class()
        assert issubclass(cls, flwr_strategies.FedAvg), name  # Flower's own implementations (FedAvg family)
        signature = inspect.signature(cls.__init__).parameters
        for spec in entry.params:
            assert spec.name in signature, f"{name}: Flower's {cls.__name__} has no argument {spec.name}"
    assert get_entry("fedavg").strategy_class() is StreamingFedAvg


def test_params_reach_flower_strategy() -> None:
    s = build("fedadam", {"eta": 0.3, "beta-1": 0.5, "tau": 1e-2}, sampling=sampling(4))
    assert isinstance(s, flwr_strategies.FedAdam) and (s.eta, s.beta_1, s.tau) == (0.3, 0.5, 0.01)
    s = build("multikrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 2.0}, sampling=sampling(5))
    assert (s.num_malicious_nodes, s.num_nodes_to_select) == (1, 2)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("fedavg", {"beta": 0.1}, "strategy 'fedavg' has no setting 'beta': its settings are none"),
        ("fedadam", {"etaa": 0.1}, "has no setting 'etaa': its settings are eta, eta_l, beta_1, beta_2, tau"),
        ("fedadam", {"beta_1": 1.0}, "beta_1 must be in \\[0, 1\\)"),
        ("fedadam", {"eta": "fast"}, "eta must be a number"),
        ("fedadam", {"eta": True}, "eta must be a number"),
        ("fedtrimmedavg", {"beta": 0.5}, "beta must be in \\[0, 0.5\\)"),
        ("krum", {"num_malicious_nodes": 1.5}, "num_malicious_nodes must be a whole number"),
        ("krum", {"num_malicious_nodes": 2}, "needs at least 2f\\+3 = 7 clients per round, got 5"),
        ("bulyan", {"num_malicious_nodes": 1}, "needs at least 4f\\+3 = 7 clients per round, got 5"),
        ("multikrum", {"num_nodes_to_select": 9}, "num_nodes_to_select=9 is more than the 5 clients"),
        ("fedavgm", {"server_momentum": -0.1}, "server_momentum must be in \\[0, 1\\)"),
    ],
)
def test_bad_params_name_the_key(name: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_params(name, params, clients_per_round=5)


def test_unknown_strategy_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd': choose one of fedavg, fedavgm, .*fedtrimmedavg"):
        RunConfig(strategy="fedsgd")
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'"):
        get_entry("fedsgd")


@pytest.mark.parametrize("name", ROBUST_STRATEGIES)
def test_robust_aggregators_refuse_secagg_and_say_what_to_do(name: str) -> None:
    with pytest.raises(ConfigError, match=f"'{name}' needs every client's individual update.*--no-secagg.*fedavg"):
        RunConfig(strategy=name, secagg=True)
    RunConfig(strategy=name, secagg=False)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"client_dp": "central", "client_clip_norm": 1.0, "client_epsilon": 3.0}, "server clips every client's update.*distributed.*--no-secagg"),
        ({"client_dp": "central", "client_clip_norm": 1.0, "client_epsilon": 3.0, "secagg": False, "strategy": "krum"}, "'krum' does not average"),
        ({"client_dp": "distributed", "client_epsilon": 3.0}, "needs --client-clip-norm"),
        ({"client_dp": "distributed", "client_clip_norm": 1.0}, "exactly one of --client-noise-multiplier"),
        ({"client_dp": "distributed", "client_clip_norm": 1.0, "client_epsilon": 3.0, "client_noise_multiplier": 1.0}, "both were given"),
        ({"client_dp": "local", "client_clip_norm": 1.0}, "unknown client-dp mode 'local'"),
        ({"client_clip_norm": 1.0}, "client-clip-norm set but client-level DP is off"),
        ({"client_sampling": "poisson"}, "client-sampling set but client-level DP is off"),
        ({"max_update_norm": 5.0}, "max-update-norm checks each client's update.*--no-secagg"),
        ({"max_update_norm": -1.0, "secagg": False}, "max-update-norm must be a finite number > 0"),
    ],
)
def test_composition_is_checked_at_start_up(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig(**settings)


def test_strategy_table_from_config_file_and_flower_run_config(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[fedshield]\nstrategy = "fedtrimmedavg"\nsecagg = false\n\n[strategy]\nbeta = 0.1\n')
    cfg = load_config_file(path)
    assert cfg.strategy == "fedtrimmedavg" and dict(cfg.strategy_params) == {"beta": 0.1}
    path.write_text('secagg = false\n[strategy]\nname = "krum"\nnum-malicious-nodes = 0\n')
    cfg = load_config_file(path)
    assert cfg.strategy == "krum" and dict(cfg.strategy_params) == {"num_malicious_nodes": 0}
    again = RunConfig.from_mapping(json.loads(json.dumps(cfg.to_flat_dict())))
    assert again == cfg and hash(again) == hash(cfg)
    flower = RunConfig.from_mapping({"strategy": "fedprox", "strategy-params.proximal-mu": 0.01, "max-update-norm": 0,
                                     "client-epsilon": 0}, zero_is_unset=True)
    assert dict(flower.strategy_params) == {"proximal_mu": 0.01} and flower.max_update_norm is None
    path.write_text('[fedshield]\nstrategy = "fedavg"\n[strategy]\nmomentum = {a = 1}\n')
    with pytest.raises(ConfigError, match="strategy setting 'momentum' must be a number"):
        load_config_file(path)


def test_build_strategy_checks_params_at_start_up() -> None:
    with pytest.raises(ConfigError, match="strategy 'fedprox' has no setting 'mu'"):
        build_strategy(RunConfig(strategy="fedprox", strategy_params={"mu": 0.1}))


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("strategy", "secagg"), [("fedavg", True), ("fedavg", False), ("krum", False)])
@pytest.mark.parametrize(("fraction", "asked"), [(1.0, 10), (0.3, 3), (0.01, 1), (0.0, 0)])
def test_fraction_evaluate_sets_how_many_clients_evaluate(strategy: str, secagg: bool, fraction: float,
                                                          asked: int) -> None:
    """Through the whole wrapper chain (SecAgg+ included): the rounded share, at least one, none for 0."""
    config = RunConfig(num_clients=10, fraction_evaluate=fraction, strategy=strategy, secagg=secagg)
    assert config.expected_evaluate_clients == asked
    messages = list(build_strategy(config).top.configure_evaluate(
        1, ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}), ConfigRecord({}), FakeGrid(10)))  # type: ignore[arg-type]
    assert len(messages) == asked
    assert len({m.metadata.dst_node_id for m in messages}) == asked


@pytest.mark.parametrize(("shares", "threshold", "expected"), [
    (1.0, 0.66, (1.0, 0.66)), (5.0, 3.0, (5, 3)), (7, 0.75, (7, 0.75)), (0.5, 2.0, (0.5, 2))])
def test_secagg_shares_and_threshold_reach_secagg_as_counts_or_fractions(
        shares: float, threshold: float, expected: tuple[int | float, int | float]) -> None:
    from fedshield.strategies.secagg import SecAggPlus

    config = RunConfig(num_clients=10, secagg_shares=shares, secagg_threshold=threshold)
    (secagg,) = [layer for layer in build_strategy(config).layers if isinstance(layer, SecAggPlus)]
    assert (secagg.num_shares, secagg.reconstruction_threshold) == expected
    assert [type(v) for v in (secagg.num_shares, secagg.reconstruction_threshold)] == [type(v) for v in expected]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"secagg_shares": 2}, "secagg-shares must be a fraction in \\(0, 1\\] or a whole count >= 3"),
    ({"secagg_shares": 4.5}, "secagg-shares must be"),
    ({"secagg_threshold": 1.5}, "secagg-threshold must be a fraction in \\(0, 1\\] or a whole count >= 2"),
    ({"secagg_shares": 5, "secagg_threshold": 6}, "secagg-threshold 6 is above secagg-shares 5"),
])
def test_bad_secagg_parameters_are_named(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig(**kwargs)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_bad_fraction_evaluate_is_named(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"fraction-evaluate must be in \[0, 1\]"):
        RunConfig(fraction_evaluate=fraction)


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
    strategy = build_strategy(RunConfig(num_clients=n, secagg=False, dp=False)).top
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
    from test_secagg import _LocalGrid, assert_weighted_average, initial_arrays, make_client_app
    from test_secagg import as_numpy as numpy_of

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


# --- every strategy end to end, in one simulation -----------------------------------------------------------

E2E_PARAMS: dict[str, dict[str, Any]] = {
    "fedavgm": {"server_momentum": 0.5}, "fedprox": {"proximal_mu": 0.1},
    "multikrum": {"num_nodes_to_select": 2}, "fedtrimmedavg": {"beta": 0.25},
}


@pytest.fixture(scope="module")
def all_strategy_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunConfig]:
    """All 11 strategies, 4 clients x 2 rounds each, averaging ones under SecAgg+, robust ones without."""
    from _multirun import run_many

    root = tmp_path_factory.mktemp("strategies")
    configs = {
        name: RunConfig(task="digits", num_clients=4, num_rounds=2, local_epochs=1, dp=False, strategy=name,
                        strategy_params=E2E_PARAMS.get(name, {}), secagg=name not in ROBUST_STRATEGIES,
                        out=root / name)
        for name in STRATEGIES
    }
    run_many(list(configs.values()))
    return configs


@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_runs_end_to_end(all_strategy_runs: dict[str, RunConfig], name: str) -> None:
    config = all_strategy_runs[name]
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_trained"] == 4 and r["clients_failed"] == 0 for r in rows), rows
    assert all(r["clients_rejected"] == 0 and r["rejected"] == [] for r in rows), rows
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    saved = json.loads((config.out / "config.json").read_text())
    assert saved["strategy"] == name and saved["strategy_params"] == E2E_PARAMS.get(name, {})
    weights = load_file(config.out / "model.safetensors")
    initial = get_task("digits").new_model(config.seed).state_dict()
    assert any(not np.allclose(weights[k].numpy(), initial[k].numpy()) for k in initial), "the model never moved"
    assert all(np.isfinite(w.numpy()).all() for w in weights.values())
    privacy = json.loads((config.out / "privacy.json").read_text())
    assert privacy["client_level"]["enabled"] is False
