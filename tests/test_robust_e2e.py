"""Robust aggregation under attack, end to end on Flower's simulation engine: 1 of 5 clients sign-flips its update
(sends ``w_global - 10 * (w_honest - w_global)``). FedMedian and Krum stay within 3 accuracy points of their clean
runs; FedAvg collapses, unless update validation (``max_update_norm``) rejects the attacker's update first.
Breast-cancer (5 x ~73 records, plain SGD, 3 rounds) keeps it to one short simulation.

The attacker is a test-only client hook (``_sim_batch``) around fedshield's own handlers, so no fault injector ships
in the package. All seven runs (clean and attacked, three strategies, and FedAvg with update validation) share the
simulation of the 5-client tests; the ``attacked-*`` runs carry the hook.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import _sim_batch as sim_batch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

from fedshield import protocol as P
from fedshield.config import RunConfig

pytestmark = [pytest.mark.usefixtures("no_leftover_processes"), sim_batch.TIMEOUT]

ATTACKER = 0  # partition id of the malicious client (20% of 5)
FLIP = -10.0

def _flip(msg: Message, context: Context, reply: Message) -> Message:
    """The client hook (``_sim_batch``) of every ``attacked-*`` run: the attacker sign-flips fedshield's real update."""
    if int(context.node_config["partition-id"]) != ATTACKER or reply.has_error():
        return reply
    glob, honest = msg.content[P.ARRAYS], reply.content[P.ARRAYS]
    flipped = {}
    for key, g in glob.items():
        g_np, w_np = g.numpy(), honest[key].numpy()
        flipped[key] = Array(np.asarray(g_np + FLIP * (w_np - g_np), dtype=g_np.dtype))
    content = RecordDict({P.ARRAYS: ArrayRecord(flipped), P.METRICS: reply.content[P.METRICS]})
    return Message(content=content, reply_to=msg)


STRATEGIES = {"fedavg": {}, "fedmedian": {}, "krum": {"num_malicious_nodes": 1}}
#: Honest updates have norm ~1.8 in round 1 and less later; the attacker's is ten times that.
MAX_UPDATE_NORM = 5.0


def _config(out: Path, name: str, params: dict[str, int], **extra: float) -> RunConfig:
    return RunConfig(task="breast-cancer", num_clients=5, num_rounds=3, local_epochs=2, sample_rate=0.125, lr=0.5,
                     dp=False, secagg=False, seed=3, strategy=name, strategy_params=params, out=out, **extra)


RUNS = {f"{kind}-{name}": (name, params, {}) for kind in ("clean", "attacked") for name, params in STRATEGIES.items()}
RUNS["attacked-fedavg-validated"] = ("fedavg", {}, {"max_update_norm": MAX_UPDATE_NORM})
for _run, (_strategy, _params, _extra) in RUNS.items():  # in the shared simulation of the 5-client tests
    sim_batch.register(f"robust/{_run}", lambda root, r=_run, s=_strategy, p=_params, e=_extra: _config(
        root / r, s, p, **e), clients=5, client_hook=_flip if _run.startswith("attacked-") else None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, float]]]:
    batch = sim_batch.results(tmp_path_factory, clients=5)
    configs = [batch.config(f"robust/{name}") for name in RUNS]
    return {cfg.out.name: [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
            for cfg in configs}


@pytest.fixture(scope="module")
def accuracies(runs: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    for name, rows in runs.items():
        if name != "attacked-fedavg-validated":
            assert [r["clients_trained"] for r in rows] == [5, 5, 5], (name, rows)
    return {name: float(rows[-1]["accuracy"]) for name, rows in runs.items()}


@pytest.mark.parametrize("name", ["fedmedian", "krum"])
def test_robust_aggregator_stays_within_3_points_of_clean(accuracies: dict[str, float], name: str) -> None:
    clean, attacked = accuracies[f"clean-{name}"], accuracies[f"attacked-{name}"]
    assert clean > 0.9, accuracies  # the clean run learned, so "within 3 points" means something
    assert attacked >= clean - 0.03, accuracies


def test_fedavg_degrades_under_the_same_attack(accuracies: dict[str, float]) -> None:
    clean, attacked = accuracies["clean-fedavg"], accuracies["attacked-fedavg"]
    assert clean > 0.9, accuracies
    assert attacked < clean - 0.2, accuracies


def test_validation_rejects_the_attacker_and_the_round_goes_on(
    runs: dict[str, list[dict[str, float]]], accuracies: dict[str, float]
) -> None:
    rows = runs["attacked-fedavg-validated"]
    assert [(r["clients_trained"], r["clients_failed"], r["clients_rejected"]) for r in rows] == [(4, 0, 1)] * 3, rows
    assert all("exceeds max-update-norm 5" in r["rejected"][0]["reason"] for r in rows), rows
    assert accuracies["attacked-fedavg-validated"] >= accuracies["clean-fedavg"] - 0.03, accuracies
