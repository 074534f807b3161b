"""A malicious coordinator: fedshield's own ServerApp, with SecAgg+'s SHARE_KEYS stage tampered with.

Submitted by tests/test_secagg_malicious_server.py with ``flwr run`` to a real SuperLink that real ``fedshield
client`` sites are connected to. The attack is the one signed round keys must stop: in SHARE_KEYS every site is
handed key pairs the server made in place of its peers' keys, so that the site would derive its pairwise masks
with, and encrypt the shares of its secrets to, keys the server holds, and the server could unmask its update.

* round 1, a different forgery for each site (in node-id order):
  - ``swap-keys``: server-made keys with the peers' genuine signatures forwarded unchanged;
  - ``foreign-signer``: server-made keys with valid signatures by a server key that is in no site's roster;
  - ``relabel``: the peers' genuine signed keys, each under the other peer's node id;
* round 2: honest, except for the next round's key exchange that rides in its UNMASK (SecAgg+ one round ahead,
  ``fedshield.strategies._secagg_pipeline``): every site is handed the same three forgeries of its peers' round-3
  keys, in the same node-id order;
* round 3: honest (it runs the full key exchange, as nothing was prepared for it).

What each site answered in the tampered stages goes to ``<out>/mitm.json`` (round 1) and ``<out>/mitm-ahead.json``
(round 2's next-round part).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ConfigRecord, Context
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes

import fedshield.strategies._secagg_stages as stages
import fedshield.strategies.secagg as secagg
from fedshield.protocol import SECAGG_NEXT, SECAGG_NEXT_KEY, SECAGG_NEXT_REFUSED, prefixed, take_prefixed
from fedshield.crypto.secagg_auth import sign_round_keys, signed_payload
from fedshield.server.app import read_run_config
from fedshield.server.runner import run_server

app = ServerApp()
_honest_exchange = stages._exchange
_SERVER_KEY = ec.generate_private_key(ec.SECP384R1())
ATTACKS = ("swap-keys", "foreign-signer", "relabel")


def _forged(attack: str, nid: int, real: list[bytes], others: dict[int, list[bytes]], run_id: int,
            round_tag: str) -> list[bytes]:
    if attack == "relabel":
        return next(entry for other, entry in others.items() if other != nid)
    pk1, pk2 = (public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2))
    if attack == "swap-keys":
        return [pk1, pk2, *real[2:]]  # the genuine signature, over the genuine keys
    payload = signed_payload(run_id=run_id, round_tag=round_tag, node_id=nid, stage=Stage.SETUP, pk1=pk1, pk2=pk2)
    signature, signer = sign_round_keys(_SERVER_KEY, payload)
    return [pk1, pk2, signature, signer.encode()]


def _tamper(rec: ConfigRecord, dst: int, attack: str, run_id: int, round_tag: str) -> None:
    others = {int(k): list(rec[k]) for k in rec if k.isdigit() and int(k) != dst}  # type: ignore[arg-type]
    for nid, real in others.items():
        rec[str(nid)] = _forged(attack, nid, real, others, run_id, round_tag)


def _tampering_exchange(out: Path, run_id: int) -> Any:
    def exchange(grid: Grid, state: Any, stage: str, records: dict[int, ConfigRecord], timeout: float | None) -> Any:
        if stage != Stage.SHARE_KEYS or state.server_round != 1:
            return _honest_exchange(grid, state, stage, records, timeout)
        attacks = dict(zip(sorted(records), ATTACKS, strict=False))
        for dst, attack in attacks.items():
            _tamper(records[dst], dst, attack, run_id, str(state.server_round))
        replies = _honest_exchange(grid, state, stage, records, timeout)
        line = {"round": state.server_round, "attacks": {str(k): v for k, v in attacks.items()},
                "sent_shares": sorted(replies), "errors": {str(k): v for k, v in state.errors.items()}}
        (out / "mitm.json").write_text(json.dumps(line))
        return replies

    return exchange


def _tampering_ahead(out: Path, run_id: int) -> tuple[Any, Any]:
    honest_records, honest_settle = secagg.next_round_records, secagg.settle_next_round
    attacks: dict[int, str] = {}

    def records(state: Any) -> Any:
        out_records = honest_records(state)
        if state.server_round == 3:
            attacks.update(zip(sorted(out_records), ATTACKS, strict=False))
            for dst, attack in attacks.items():
                entries = ConfigRecord(take_prefixed(out_records[dst], SECAGG_NEXT_KEY))
                _tamper(entries, dst, attack, run_id, str(state.server_round))
                out_records[dst].update(prefixed(SECAGG_NEXT_KEY, entries))
        return out_records

    def settle(state: Any, replies: Any) -> Any:
        if state.server_round == 3:
            answers = {str(nid): {k[len(SECAGG_NEXT):]: v for k, v in reply.config_records[RECORD_KEY_CONFIGS].items()
                                  if k.startswith(SECAGG_NEXT)} for nid, reply in replies.items()}
            line = {"attacks": {str(k): v for k, v in attacks.items()},
                    "refused": {nid: a.get(SECAGG_NEXT_REFUSED) for nid, a in answers.items()},
                    "sent_shares": sorted(nid for nid, a in answers.items() if SECAGG_NEXT_REFUSED not in a)}
            (out / "mitm-ahead.json").write_text(json.dumps(line))
        return honest_settle(state, replies)

    return records, settle


@app.main()
def main(grid: Grid, context: Context) -> None:
    config, _ = read_run_config(context.run_config)
    stages._exchange = _tampering_exchange(Path(config.out), context.run_id)
    secagg.next_round_records, secagg.settle_next_round = _tampering_ahead(Path(config.out), context.run_id)
    run_server(grid, config, state_root=str(config.out / "clients"))
