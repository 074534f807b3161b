"""A malicious site costs one site, not the run: crafted clear values in its replies, end to end.

Four short fedshield runs of 5 breast-cancer clients, 2 rounds each, in the shared simulation of the 5-client tests
(``_sim_batch``: one Ray start). In every run client 0 is hostile (see ``ATTACKS``). The crafted reply is the test's
own (``_attack``, the run's client hook): fedshield's real training handler runs, then the hook rewrites the reply's
clear metrics (and, for ``flip``, its update) BEFORE Flower's ``secaggplus_mod`` masks it, exactly where a site that
controls its own code could.

Each scenario must: complete every round; drop the hostile site every round with its reason in ``metrics.jsonl``
(the model improves from the honest sites); charge every honest site's ledger for exactly the rounds that produced
a model (no round aborted for everyone while honest sites paid).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import _sim_batch as sim_batch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict

from fedshield import protocol as P
from fedshield.config import RunConfig

pytestmark = [pytest.mark.usefixtures("no_leftover_processes"), sim_batch.TIMEOUT]

ATTACKER = 0
ROUNDS = 2
#: Run name -> (SecAgg+ on, metric overrides, update scale (None: the honest update)).
ATTACKS: dict[str, tuple[bool, dict[str, float], float | None]] = {
    "secagg-nan-epsilon": (True, {P.EPSILON: float("nan")}, None),
    "secagg-inf-steps": (True, {P.STEPS: float("inf")}, None),
    "secagg-huge-count": (True, {P.NUM_EXAMPLES: 1e12}, None),
    "plain-huge-weight-flip": (False, {P.NUM_EXAMPLES: 1e12}, -20.0),
}
#: What each scenario's drop reason must say.
REASONS = {
    "secagg-nan-epsilon": "'epsilon' must be finite",
    "secagg-inf-steps": "'steps' must be finite",
    "secagg-huge-count": "reported 1000000000000 examples",
    "plain-huge-weight-flip": "exceeds max-update-norm 10",
}

def _attack(name: str, msg: Message, context: Context, reply: Message) -> Message:
    """Run ``name``'s client hook (``_sim_batch``): fedshield's real training handler has run; the hostile site
    rewrites its reply's clear metrics (and, for ``flip``, its update) before ``secaggplus_mod`` masks it."""
    if int(context.node_config["partition-id"]) != ATTACKER or reply.has_error():
        return reply
    _, overrides, scale = ATTACKS[name]
    arrays = reply.content[P.ARRAYS]
    if scale is not None:
        glob = msg.content[P.ARRAYS]
        arrays = ArrayRecord({k: Array(np.asarray(g.numpy() + scale * (arrays[k].numpy() - g.numpy()),
                                                  dtype=g.numpy().dtype)) for k, g in glob.items()})
    metrics = MetricRecord({**dict(reply.content[P.METRICS]), **overrides})
    return Message(content=RecordDict({P.ARRAYS: arrays, P.METRICS: metrics}), reply_to=msg)


def _config(out: Path, secagg: bool) -> RunConfig:
    # max_update_norm 10 is `fedshield server`'s default without SecAgg+ (DEFAULT_MAX_UPDATE_NORM).
    return RunConfig(task="breast-cancer", num_clients=5, num_rounds=ROUNDS, local_epochs=1, sample_rate=0.25,
                     lr=0.5, epsilon=8.0, secagg=secagg, seed=5, out=out,
                     max_update_norm=None if secagg else 10.0)


for _name, (_secagg, _, _) in ATTACKS.items():  # in the shared simulation of the 5-client tests (one Ray start)
    sim_batch.register(f"malicious/{_name}", lambda root, n=_name, s=_secagg: _config(root / n, s), clients=5,
                       client_hook=functools.partial(_attack, _name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[dict], dict]]:
    batch = sim_batch.results(tmp_path_factory, clients=5)
    configs = [batch.config(f"malicious/{name}") for name in ATTACKS]
    return {cfg.out.name: ([json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()],
                           json.loads((cfg.out / "privacy.json").read_text()))
            for cfg in configs}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_the_run_completes_and_drops_only_the_malicious_site(runs: dict, name: str) -> None:
    rows, _ = runs[name]
    assert [r["round"] for r in rows] == list(range(1, ROUNDS + 1)), rows
    assert [(r["clients_trained"], r["clients_rejected"], r["clients_failed"]) for r in rows] == [(4, 1, 0)] * ROUNDS
    assert all(REASONS[name] in r["rejected"][0]["reason"] for r in rows), [r["rejected"] for r in rows]
    assert rows[-1]["accuracy"] > 0.8, rows  # the honest sites' updates were aggregated


@pytest.mark.parametrize("name", list(ATTACKS))
def test_honest_ledgers_pay_only_for_rounds_that_produced_a_model(runs: dict, name: str) -> None:
    rows, privacy = runs[name]
    produced = sum(r["clients_trained"] > 0 for r in rows)
    assert produced == ROUNDS
    # Under SecAgg+ a dropped reply's figures are not kept, so the attacker is known by node id, not partition.
    honest = {k: v for k, v in privacy["clients"].items() if v["partition_id"] not in (None, ATTACKER)}
    attacker = [v for k, v in privacy["clients"].items() if v["partition_id"] in (None, ATTACKER)]
    assert len(honest) == 4 and len(attacker) == 1, privacy["clients"].keys()
    assert [f["round"] for f in attacker[0]["failures"]] == list(range(1, ROUNDS + 1)), attacker
    for entry in honest.values():
        assert entry["rounds_trained"] == produced, entry
        assert entry["epsilon_source"] == "history", entry  # its own ledger holds no more than the server's account
        assert entry["failures"] == [], entry
    assert privacy["guarantee"]["epsilon"] is not None and privacy["guarantee"]["epsilon"] > 0
