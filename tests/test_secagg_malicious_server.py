"""A malicious coordinator substitutes SecAgg+ public keys; real ``fedshield client`` sites detect it and refuse.

Real processes on 127.0.0.1: a TLS SuperLink with node authentication (``fedshield.deploy.coordinator``), three
sites started with the ``fedshield client`` CLI (each with ``--roster``, the authorized-nodes.txt), and a run
submitted with ``flwr run`` whose ServerApp is fedshield's own with SHARE_KEYS tampered
(``tests/apps/secagg_mitm/secagg_mitm.py``). One run of three rounds holds every check:

* round 1: each site gets a different forgery of its peers' keys in SHARE_KEYS: server-made keys with the peers'
  genuine signatures; server-made keys signed by a server key in no roster; the peers' genuine signed keys under
  each other's node ids. Each site refuses with ``fedshield:secagg-refused`` naming what it found, sends no share,
  and trains nothing (its privacy ledger is charged for round 2 only); the refusals come from the sites' SuperNodes,
  which answer SecAgg+'s key and unmask stages themselves (a ClientApp starts only for a masked vector);
* round 2: honest, except that the next round's keys, which ride in its UNMASK (SecAgg+ one round ahead), are
  forged the same three ways. Each site refuses that part with the same reasons and makes no share for round 3,
  and round 2 still completes with all three sites (their round-2 shares went);
* round 3: honest; it runs the full key exchange and completes with all three sites.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _processes import Cli, digits_sites

from fedshield.config import RunConfig
from fedshield.crypto import init_keys
from fedshield.deploy import free_port
from fedshield.deploy.flwr_run import submit_run
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedshield.deploy.coordinator import ServerOptions, flower_run_config, prepare_app, start_server

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

SITES = 3
MITM = Path(__file__).parent / "apps" / "secagg_mitm" / "secagg_mitm.py"


def _mitm_app(config: RunConfig, directory: Path) -> Path:
    """fedshield's app bundle with the ServerApp swapped for the tampering one; the ClientApp stays fedshield's.

    The bundle carries no code (a fedshield site refuses one that does): the tampering ServerApp is importable on
    the coordinator's own machine (its PYTHONPATH), which is where a ServerApp runs.
    """
    app = prepare_app(config, directory)
    text = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(text.replace('serverapp = "fedshield.server.app:app"',
                                                     'serverapp = "secagg_mitm:app"'))
    return app


def test_substituted_secagg_keys_are_refused_and_an_honest_round_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The coordinator's machine can import the tampering ServerApp (the SuperLink, its ServerApp and `flwr run`
    # inherit this); the sites run only their own installed code.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(MITM.parent), os.environ.get("PYTHONPATH", "")) if p))
    keys = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=SITES)
    sites = digits_sites(tmp_path, SITES)
    out = tmp_path / "run"
    config = RunConfig(num_clients=SITES, num_rounds=3, seed=7, local_epochs=1, fraction_evaluate=0.0, out=out)
    server = start_server(ServerOptions(keys=keys.directory, fleet_address=f"127.0.0.1:{free_port()}",
                                        control_port=free_port()), home=tmp_path / "superlink")
    clients: list[Cli] = []
    try:
        for i, data in enumerate(sites, 1):
            clients.append(Cli.start(
                ["client", "--server", server.superlink.fleet_address, "--ca", str(keys.ca_cert), "--node-key",
                 str(keys.node(f"node-{i}").private_key_path), "--roster", str(keys.authorized_nodes), "--data",
                 str(data), "--state", str(tmp_path / f"state-{i}")], tmp_path / f"client-{i}.out"))
        for client in clients:
            client.wait_for(r"as node (\d+)", timeout=180)
        run_id = submit_run(_mitm_app(config, tmp_path / "app"), server.superlink.connection,
                            run_config=flower_run_config(config))
        result = server.follow(run_id, config, status_every_s=5.0, timeout=480)
        assert result.completed, f"{result.status}: {result.details}\n{result.log[-3000:]}"
    finally:
        for client in clients:
            client.interrupt()
        server.close()

    seen = json.loads((out / "mitm.json").read_text())
    assert sorted(seen["attacks"].values()) == ["foreign-signer", "relabel", "swap-keys"]
    assert seen["sent_shares"] == [], seen  # no site sent a single share
    expected = {"swap-keys": "do not verify under roster key", "foreign-signer": "which is not in the roster",
                "relabel": "another run, round or node id"}
    for nid, attack in seen["attacks"].items():
        reason = seen["errors"][nid]
        assert reason.startswith("fedshield:secagg-refused: node ") and expected[attack] in reason, (attack, reason)

    ahead = json.loads((out / "mitm-ahead.json").read_text())
    assert sorted(ahead["attacks"].values()) == ["foreign-signer", "relabel", "swap-keys"]
    assert ahead["sent_shares"] == [], ahead  # no site made a single round-3 share for forged keys
    for nid, attack in ahead["attacks"].items():
        reason = ahead["refused"][nid]
        assert reason.startswith("fedshield:secagg-refused: node ") and expected[attack] in reason, (attack, reason)

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["clients_trained"]) for r in rows] == [(1, 0), (2, SITES), (3, SITES)], rows
    for i in range(1, SITES + 1):  # the refused round cost no privacy: rounds 2 and 3 alone are charged
        ledger = PrivacyLedger.load(tmp_path / f"state-{i}" / LEDGER_FILE)
        assert [r[1] for r in ledger.rounds] == [2, 3], ledger
        # Every refusal above came from the site's SuperNode itself (fedshield.deploy.node_stages): a ClientApp
        # started only for the two masked vectors the site trained.
        log = (tmp_path / f"state-{i}" / "supernode.log").read_text()
        assert log.count("Start `flwr-clientapp` process") == 2 and log.count("Receiving: ") == 10, log[-3000:]
