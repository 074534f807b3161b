"""A malicious site costs one site, not the run: crafted clear values in its replies, end to end.

One Flower simulation (one Ray start) runs four short fedshield runs of 5 breast-cancer clients, 2 rounds each. In
every run client 0 is hostile; the run's directory name says how (see ``ATTACKS``). The crafted ClientApp is the
test's own: it runs fedshield's real training handler, then rewrites the reply's clear metrics (and, for ``flip``,
its update) BEFORE Flower's ``secaggplus_mod`` masks it, exactly where a site that controls its own code could.

Each scenario must: complete every round; drop the hostile site every round with its reason in ``metrics.jsonl``
(the model improves from the honest sites); charge every honest site's ledger for exactly the rounds that produced
a model (no round aborted for everyone while honest sites paid).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from _multirun import run_many
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedshield import protocol as P
from fedshield.client import app as fedshield_app
from fedshield.config import RoundSettings, RunConfig

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

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

attack_app = ClientApp()


@attack_app.train(mods=[fedshield_app.refuse_plain_updates, fedshield_app.secagg_when_requested])
def _train(msg: Message, context: Context) -> Message:
    reply = fedshield_app.train(msg, context)
    settings = RoundSettings.from_record_dict(dict(msg.content[P.CONFIG]))
    attack = ATTACKS.get(Path(settings.sim_state_root).parent.name)
    if attack is None or int(context.node_config["partition-id"]) != ATTACKER or reply.has_error():
        return reply
    _, overrides, scale = attack
    arrays = reply.content[P.ARRAYS]
    if scale is not None:
        glob = msg.content[P.ARRAYS]
        arrays = ArrayRecord({k: Array(np.asarray(g.numpy() + scale * (arrays[k].numpy() - g.numpy()),
                                                  dtype=g.numpy().dtype)) for k, g in glob.items()})
    metrics = MetricRecord({**dict(reply.content[P.METRICS]), **overrides})
    return Message(content=RecordDict({P.ARRAYS: arrays, P.METRICS: metrics}), reply_to=msg)


@attack_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return fedshield_app.evaluate(msg, context)


def _config(out: Path, secagg: bool) -> RunConfig:
    # max_update_norm 10 is `fedshield server`'s default without SecAgg+ (DEFAULT_MAX_UPDATE_NORM).
    return RunConfig(task="breast-cancer", num_clients=5, num_rounds=ROUNDS, local_epochs=1, sample_rate=0.25,
                     lr=0.5, epsilon=8.0, secagg=secagg, seed=5, out=out,
                     max_update_norm=None if secagg else 10.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[dict], dict]]:
    root = tmp_path_factory.mktemp("malicious")
    configs = [_config(root / name, secagg) for name, (secagg, _, _) in ATTACKS.items()]
    run_many(configs, client_app=attack_app)
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
