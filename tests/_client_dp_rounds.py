"""Hand-made rounds for ClientLevelDP: a small global model, train messages from the wrapper, replies carrying
updates of a chosen size, a noise source of zeros (to test the arithmetic without the noise), and the exact
epsilon of a Gaussian composition that the accountants are checked against."""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from scipy import optimize, stats

from fedshield import protocol as P
from fedshield.strategies.client_level_dp import ClientLevelDP

from _grid import FakeGrid

DELTA = 1e-5


# --- the server wrapper ----------------------------------------------------------------------------------------


class ZeroNoise:
    def standard_normal(self, size: Any) -> np.ndarray:
        return np.zeros(size)


GLOBAL = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "s": np.asarray(0.25, dtype=np.float64),
          "count": np.asarray([3], dtype=np.int64)}


def configure_round(strategy: ClientLevelDP, n: int) -> list[Message]:
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord({}), FakeGrid(n)))
    for m in msgs:
        m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msgs


def reply_with(msg: Message, update: dict[str, np.ndarray], weight: float = 1.0) -> Message:
    model = {k: np.asarray(GLOBAL[k] + update.get(k, 0), dtype=GLOBAL[k].dtype) for k in GLOBAL}
    return Message(RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in model.items()}),
                               P.METRICS: MetricRecord({P.NUM_EXAMPLES: weight, "train-loss": 0.5})}), reply_to=msg)


def random_updates(n: int, scale: float) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"w": scale * rng.normal(size=(3, 4)), "s": np.asarray(scale * rng.normal())} for _ in range(n)]

def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a mu-GDP mechanism (Dong, Roth & Su 2019): delta(eps) = Phi(-eps/mu + mu/2) -
    e^eps Phi(-eps/mu - mu/2). R unsampled Gaussian releases with multipliers z_r are mu-GDP, mu^2 = sum 1/z_r^2."""
    def gap(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return float(optimize.brentq(gap, 0.0, 500.0))

