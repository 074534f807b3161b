"""A real simulated run (Flower's engine, real Opacus), plain and under SecAgg+: every message that reaches the
server is recorded, and under record-level DP no train reply carries the site's record count or its training loss;
privacy.json states the adjacency, and every epsilon recomputes from privacy.json alone."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat

from fedshield import protocol as P
from fedshield.config import RunConfig
from fedshield.privacy.accounting import epsilon
from fedshield.server.report import RECORD_ADJACENCY

import _sim_batch as sim_batch

pytestmark = [pytest.mark.usefixtures("no_leftover_processes"), sim_batch.TIMEOUT]

CLIENTS = 3
BASE = dict(num_clients=CLIENTS, num_rounds=2, local_epochs=1, epsilon=8.0, fraction_evaluate=1.0)
#: What reached the server, per run: ``(message type, metrics)`` of every reply.
SEEN: dict[str, list[tuple[str, dict[str, Any]]]] = {"plain": [], "secagg": []}
UNLISTED: list[set[str]] = []  # fields of a compact masked-vector reply that are neither the vector nor listed


class _Recorder:
    """Delegates to Flower's grid and keeps the metric records of every reply the server pulls."""

    def __init__(self, grid: Any, seen: list[tuple[str, dict[str, Any]]]) -> None:
        self._grid, self._seen = grid, seen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def pull_messages(self, message_ids: Any) -> Any:
        replies = list(self._grid.pull_messages(message_ids))
        for msg in replies:
            if msg.has_error():
                continue
            kind = msg.metadata.message_type
            for record in msg.content.metric_records.values():
                self._seen.append((kind, dict(record)))
            if any(key.startswith("fitres.") for key in msg.content):  # a SecAgg+ masked-vector reply, legacy layout
                fitres = compat.recorddict_to_fitres(msg.content, keep_input=True)
                self._seen.append((kind, {P.NUM_EXAMPLES: fitres.num_examples, **fitres.metrics}))
            secagg = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
            if P.SECAGG_COUNT in secagg:  # a masked-vector reply, compact: everything in clear beside the vector
                clear = {k[len(P.SECAGG_METRIC):]: v for k, v in secagg.items() if k.startswith(P.SECAGG_METRIC)}
                self._seen.append((kind, {P.NUM_EXAMPLES: secagg[P.SECAGG_COUNT], **clear}))
                next_keys = {P.SECAGG_NEXT + k for k in (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, P.SECAGG_MASK_PRG,
                                                         P.SECAGG_SIGNATURE, P.SECAGG_SIGNER, P.SECAGG_NEXT_REFUSED)}
                UNLISTED.append(set(secagg) - {Key.MASKED_PARAMETERS, P.SECAGG_COUNT} - next_keys
                                - {k for k in secagg if k.startswith(P.SECAGG_METRIC)})
        return replies


for _name in SEEN:  # both runs in the shared simulation of the other 3-client tests (one Ray start)
    sim_batch.register(
        f"in_clear/{_name}", lambda root, n=_name: RunConfig(**BASE, secagg=n == "secagg", out=root / f"in_clear-{n}"),
        clients=CLIENTS, wrap_grid=lambda grid, n=_name: _Recorder(grid, SEEN[n]),
    )


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> sim_batch.Batch:
    return sim_batch.results(tmp_path_factory, clients=CLIENTS)


def test_dp_replies_carry_no_count_no_loss_and_privacy_json_recomputes(batch: sim_batch.Batch) -> None:
    configs = [batch.config(f"in_clear/{name}") for name in SEEN]
    seen = [entry for name in SEEN for entry in SEEN[name]]
    train = [m for kind, m in seen if kind == "train"]
    evaluate = [m for kind, m in seen if kind == "evaluate"]
    assert train and evaluate
    for metrics in train:
        assert P.TRAIN_LOSS not in metrics, metrics
        for key in (P.NUM_EXAMPLES, "num_examples"):
            if key in metrics:
                assert metrics[key] == P.PUBLIC_WEIGHT, metrics
    assert sum(P.NUM_EXAMPLES in m for m in train) >= 2 * 3 * 2  # both runs' replies (SecAgg+'s masked ones too)
    # The masked replies came compact (count and metrics in the SecAgg+ record), with no other field beside them:
    # the next round's public keys and signatures (SecAgg+ one round ahead) are what SETUP replies always carried.
    assert len(UNLISTED) >= 3 and not any(UNLISTED), UNLISTED
    # Nothing else travels beside the update: the ledger figures and, in round 1 (federated evaluation folded into
    # the next round's train message), the evaluation of the model the message carried.
    received = {P.RECEIVED_EXAMPLES, P.RECEIVED_LOSS, P.RECEIVED_ACCURACY}
    # ("num_examples": the same public weight, as Flower's legacy layout of a SecAgg+ masked reply spells it.)
    allowed = {P.NUM_EXAMPLES, "num_examples", P.EPSILON, P.STEPS, P.ROUNDS_TRAINED, P.DELTA, P.PARTITION_ID,
               *received}
    assert all(set(m) <= allowed for m in train), [set(m) - allowed for m in train if set(m) - allowed]
    assert sum(received <= set(m) for m in train) >= 2 * 3  # round 1 of both runs, plain and masked alike
    # Evaluation replies: listed in docs/PRIVACY.md as released in clear outside epsilon.
    assert all(set(m) <= {P.NUM_EXAMPLES, P.EVAL_LOSS, P.EVAL_ACCURACY, P.PARTITION_ID} for m in evaluate)
    for config in configs:
        privacy = json.loads((config.out / "privacy.json").read_text())
        assert privacy["guarantee"]["adjacency"] == RECORD_ADJACENCY
        assert "add/remove" in privacy["guarantee"]["statement"]
        assert privacy["randomness"]["simulated"] is True and "nominal" in privacy["randomness"]["statement"]
        assert privacy["in_clear"]["train_reply"][0].startswith(P.NUM_EXAMPLES)
        for entry in privacy["clients"].values():
            # From privacy.json alone: the history and the mechanism written beside it.
            assert entry["epsilon"] == pytest.approx(
                epsilon([tuple(h) for h in entry["history"]], delta=entry["delta"], accountant=entry["accountant"]),
                rel=1e-9)
            assert entry["rounds_trained"] == 2 and "nominal" in entry["noise"]
        assert privacy["guarantee"]["epsilon"] == max(e["epsilon"] for e in privacy["clients"].values())
        rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
        assert rows[-1]["accuracy"] > 0.15, (config.secagg, rows[-1])  # learns (chance 0.1)
        # Round 1 reports the initial model's federated evaluation (folded), round 2 its own (the last round's).
        assert [(r["federated_round"], r["clients_evaluated"]) for r in rows] == [(0, 3), (2, 3)], rows
