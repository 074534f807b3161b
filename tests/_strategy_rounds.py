"""Hand-made rounds for the strategy tests: a small model, clients' updates around it, Flower train messages and
replies, and numpy references (weighted mean, Krum, Bulyan, the server optimizers) for every registered strategy."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from scipy import stats

from fedshield.protocol import ARRAYS, METRICS, NUM_EXAMPLES
from fedshield.strategies.registry import Sampling

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

