"""The test-only ClientApp of the reliability scenarios (c) and (e) (``test_reliability.py``): fedshield's own
train and evaluate handlers, wrapped so that attacker partitions send one bad input each (every kind once over a
run) and the slow partition answers after the round timeout. No fault injector ships in the package."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedshield import protocol as P
from fedshield.client import app as fedshield_app
from fedshield.config import RoundSettings, RunConfig


# ------------------------------------------------------------------------------------------------ (c) and (e)

CLIENTS = 8
ROUNDS = 3
ATTACKERS = 4  # partitions 0..3 misbehave in runs named "malicious"; 4..7 are honest
SLOW = 0  # the partition that is slower than the round timeout in runs named "slow-*"
ROUND_TIMEOUT = 8.0
SLOW_EXTRA_S = 3.0  # the slow client answers this long after the server stopped waiting
#: Rounds in which the slow client is slow. Under SecAgg+ only the last: Flower's simulation engine runs a node's
#: messages concurrently and writes each one's context back when it ends, so a late reply from round r would
#: overwrite the SecAgg+ keys the same node received for round r + 1 (a simulation artefact, not a timeout).
SLOW_ROUNDS = {"slow-plain": (1, 2, 3), "slow-secagg": (3,)}
MAX_UPDATE_NORM = 5.0  # honest breast-cancer updates have norm ~1.8 in round 1 and less later
OVERSIZED_BYTES = 64 * 2**20


def _nan(glob: dict[str, np.ndarray], honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    bad = dict(honest)
    bad["0.weight"] = honest["0.weight"].copy()
    bad["0.weight"].flat[:5] = np.nan
    return bad


def _inf(glob: dict[str, np.ndarray], honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    bad = dict(honest)
    bad["2.bias"] = np.array([np.inf, -np.inf], dtype=np.float32)
    return bad


def _transposed(glob: dict[str, np.ndarray], honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**honest, "0.weight": np.ascontiguousarray(honest["0.weight"].T)}


def _float64(glob: dict[str, np.ndarray], honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in honest.items()}


def _int32(glob: dict[str, np.ndarray], honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**honest, "2.weight": np.round(honest["2.weight"] * 1000).astype(np.int32)}


def _oversized(glob: dict[str, np.ndarray], honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The honest update plus 64 MiB of padding under a key the model does not have."""
    return {**honest, "padding": np.zeros(OVERSIZED_BYTES // 4, dtype=np.float32)}


def _bloated(glob: dict[str, np.ndarray], honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One layer 100 times larger than the model's (same key, same dtype)."""
    return {**honest, "0.weight": np.tile(honest["0.weight"], (100, 1))}


def _huge_norm(glob: dict[str, np.ndarray], honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (glob[k] + 1000.0 * (honest[k] - glob[k])).astype(glob[k].dtype) for k in glob}


def _missing_key(glob: dict[str, np.ndarray], honest: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v for k, v in honest.items() if k != "2.bias"}


#: name -> (how the attacker changes its honest arrays, or None for a changed reply, what the reason must say)
ATTACKS: dict[str, tuple[Any, str]] = {
    "nan": (_nan, "'0.weight' holds 5 non-finite value(s)"),
    "inf": (_inf, "'2.bias' holds 2 non-finite value(s)"),
    "wrong-shape": (_transposed, "'0.weight' has shape (30, 32) and dtype float32; the global model's is (32, 30)"),
    "wrong-dtype-float64": (_float64, "has shape (32, 30) and dtype float64; the global model's is (32, 30) float32"),
    "wrong-dtype-int32": (_int32, "'2.weight' has shape (2, 32) and dtype int32"),
    "oversized-64MiB": (_oversized, "unexpected ['padding']"),
    "bloated-layer": (_bloated, "'0.weight' has shape (3200, 30) and dtype float32"),
    "huge-norm": (_huge_norm, "exceeds max-update-norm 5"),
    "missing-array": (_missing_key, "missing ['2.bias']"),
    "nan-weight": (None, "metric 'num-examples' must be a finite number >= 0, got nan"),
    "no-arrays": (None, "expected one ArrayRecord and one MetricRecord"),
}
_KINDS = list(ATTACKS)


def attack_for(partition: int, server_round: int) -> str | None:
    """Which bad input attacker ``partition`` sends in ``server_round``: every kind once over the run."""
    if partition >= ATTACKERS:
        return None
    slot = (server_round - 1) * ATTACKERS + partition
    return _KINDS[slot] if slot < len(_KINDS) else None


def _run_kind(settings: RoundSettings) -> str:
    return Path(settings.sim_state_root).parent.name


def _malicious_reply(msg: Message, reply: Message, kind: str) -> Message:
    change, _ = ATTACKS[kind]
    metrics = reply.content[P.METRICS]
    if kind == "nan-weight":
        metrics = MetricRecord({**dict(metrics), P.NUM_EXAMPLES: float("nan")})
    if kind == "no-arrays":
        return Message(content=RecordDict({P.METRICS: metrics}), reply_to=msg)
    glob = {k: a.numpy() for k, a in msg.content[P.ARRAYS].items()}
    honest = {k: a.numpy() for k, a in reply.content[P.ARRAYS].items()}
    arrays = honest if change is None else change(glob, honest)
    record = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
    return Message(content=RecordDict({P.ARRAYS: record, P.METRICS: metrics}), reply_to=msg)


faulty_app = ClientApp()


@faulty_app.train(mods=[fedshield_app.packed_wire, fedshield_app.secagg_when_requested])
def _train(msg: Message, context: Context) -> Message:
    reply = fedshield_app.train(msg, context)
    settings = RoundSettings.from_record_dict(dict(msg.content[P.CONFIG]))
    partition, run = int(context.node_config["partition-id"]), _run_kind(settings)
    if partition == SLOW and settings.server_round in SLOW_ROUNDS.get(run, ()):
        time.sleep(ROUND_TIMEOUT + SLOW_EXTRA_S)  # trained, answers too late
    kind = attack_for(partition, settings.server_round) if run == "malicious" else None
    if kind is None or reply.has_error():
        return reply
    return _malicious_reply(msg, reply, kind)


@faulty_app.evaluate(mods=[fedshield_app.packed_wire])
def _evaluate(msg: Message, context: Context) -> Message:
    return fedshield_app.evaluate(msg, context)


def sim_config(out: Path, **changes: Any) -> RunConfig:
    settings: dict[str, Any] = dict(task="breast-cancer", num_clients=CLIENTS, num_rounds=ROUNDS, local_epochs=2,
                                    sample_rate=0.125, lr=0.5, dp=False, secagg=False, seed=3, out=out)
    return RunConfig(**{**settings, **changes})


