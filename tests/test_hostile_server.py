"""A hostile coordinator against a real ``fedshield client``: every attack is refused, no code of the
coordinator's runs on the site, the site keeps serving, and its ledger stays within its own policy.

Real parts only: a stock ``flower-superlink`` (TLS, node authentication) started through ``fedshield.deploy``, a
``python -m fedshield client`` process (its SuperNode, its warm worker, real Opacus, a real ledger) and two runs
submitted with ``flwr run``:

1. a bundle that carries its own code (a package named ``fedshield`` whose ClientApp would shadow the site's and
   write a marker file): refused as ``fedshield:code-refused``, never unpacked, the marker never appears;
2. a code-free bundle naming fedshield's ClientApp, whose ServerApp (``tests/apps/hostile_lib``, installed only on
   the coordinator's host) sends every attack on the round settings at once (DP off, sigma 0.01 with no target,
   sigma 0, delta 0.5, an unknown accountant, tasks ``os:getpid`` and ``sys:exit``, an over-budget round, and
   evaluation under two seeds), then an honest round.

Two runs because a run has one bundle: a refused bundle refuses every message of its run. Two sites: one starts
each ClientApp cold (``FEDSHIELD_CLIENTAPP_ZYGOTE_ON=0``), one forks them from the pre-imported zygote (the default);
both must refuse the code-carrying bundle, and the attacks on the round settings go to the zygote site (faster).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _processes import Cli, digits_sites

from fedshield import protocol as P
from fedshield.client.policy import POLICY_REFUSAL
from fedshield.crypto import init_keys
from fedshield.deploy import ServerTls, SuperLinkConfig, free_port, run_app, start_superlink
from fedshield.deploy.site_clientapp import CODE_REFUSAL
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger

pytestmark = pytest.mark.usefixtures("no_leftover_processes")

APPS = Path(__file__).resolve().parent / "apps"
MAX_EPSILON = 6.0  # the site's own budget; the hostile server plans none (target epsilon 0)

#: attack -> the rule of the site's policy that must refuse it
POLICY_RULES = {
    "dp-off": "dp",
    "tiny-sigma-no-target": "noise-multiplier",
    "zero-sigma": "noise-multiplier",
    "delta-0.5": "delta",
    "unknown-accountant": "accountant",
    "task-os-getpid": "task",
    "task-sys-exit": "task",
    "task-sys-exit-evaluate": "task",
}


def test_a_hostile_coordinator_gets_every_attack_refused_and_runs_no_code_on_the_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=2)
    fleet = f"127.0.0.1:{free_port()}"
    server_path = os.pathsep.join(p for p in (str(APPS / "hostile_lib"), os.environ.get("PYTHONPATH", "")) if p)
    superlink = start_superlink(SuperLinkConfig(
        run_dir=tmp_path / "superlink", fleet_address=fleet, control_port=free_port(),
        tls=ServerTls.from_keyset(keys), node_auth=True, extra_env={"PYTHONPATH": server_path},
    ))
    states = {"cold": tmp_path / "state-cold", "zygote": tmp_path / "state-zygote"}
    clients: dict[str, Cli] = {}
    try:
        data = digits_sites(tmp_path, 4)
        for (kind, state), node, site_data in zip(states.items(), keys.nodes, data):
            superlink.register_node(node.public_key, name=node.name)
            monkeypatch.setenv("FEDSHIELD_CLIENTAPP_ZYGOTE_ON", "1" if kind == "zygote" else "0")
            clients[kind] = Cli.start(
                ["client", "--server", fleet, "--ca", str(keys.ca_cert), "--node-key", str(node.private_key_path),
                 "--data", str(site_data), "--state", str(state), "--task", "digits", "--max-epsilon",
                 str(MAX_EPSILON), "--allow-plain-updates", "--roster", str(keys.authorized_nodes)],
                tmp_path / f"client-{kind}.out")
        node_ids = {kind: int(c.wait_for(r"as node (\d+)", timeout=240).group(1)) for kind, c in clients.items()}
        monkeypatch.setenv("PYTHONPATH", server_path)  # `flwr run` checks the ServerApp imports where it runs

        marker, code_out = tmp_path / "PWNED", tmp_path / "code.json"
        result = run_app(APPS / "code_app", superlink.connection,
                         run_config={"out-file": str(code_out), "marker": str(marker)}, timeout=300)
        assert result.completed, result.log
        hostile_out, pickle_marker = tmp_path / "hostile.json", tmp_path / "UNPICKLED"
        result = run_app(APPS / "hostile_app", superlink.connection, timeout=600,
                         run_config={"out-file": str(hostile_out), "task": "digits", "node-id": str(node_ids["zygote"]),
                                     "pickle-marker": str(pickle_marker)})
        assert result.completed, result.log
        assert all(c.proc.poll() is None for c in clients.values()), [c.text() for c in clients.values()]
    finally:
        for c in clients.values():
            c.interrupt()
        superlink.stop()

    # 1. The code-carrying bundle: refused by both sites (cold and zygote ClientApps), never unpacked, never run.
    code_replies = json.loads(code_out.read_text())
    assert len(code_replies) == 2
    for reply in code_replies:
        assert reply["error"].startswith(f"{CODE_REFUSAL}: "), reply
        assert "fedshield/client/app.py" in reply["error"]
    assert not marker.exists(), "the coordinator's ClientApp ran on a site"
    for state in states.values():
        assert not list(state.rglob("codeserver.py")) and not list(state.rglob("app.py")), "a bundle was unpacked"
        assert CODE_REFUSAL in (state / "supernode.log").read_text(errors="replace"), "the site logs its refusal"
    state, client = states["zygote"], clients["zygote"]

    # 2. Every attack on the round settings: refused by the rule that forbids it.
    results = json.loads(hostile_out.read_text())
    for attack, rule in POLICY_RULES.items():
        assert (results[attack]["error"] or "").startswith(f"{POLICY_REFUSAL}: {rule}: "), (attack, results[attack])
        assert f"{POLICY_REFUSAL}: {rule}: " in client.text(), f"the site did not log its refusal of {attack}"
    assert results["over-budget"]["error"].startswith(P.BUDGET_REFUSAL), results["over-budget"]
    # The wire: a packed array whose table lies is refused by name; a pickle, packed or not, is never unpickled.
    assert results["packed-table-lies"]["error"].startswith("fedshield:ProtocolError: "), results["packed-table-lies"]
    assert "claims more bytes" in results["packed-table-lies"]["error"]
    for attack in ("packed-pickle", "plain-pickle"):
        assert results[attack]["error"] and results[attack]["metrics"] is None, (attack, results[attack])
    assert not pickle_marker.exists(), "a site unpickled what the server sent"
    # The server's seed does not choose the held-out records: two seeds, the same evaluation.
    assert results["seed-a"]["error"] is None and results["seed-a"]["metrics"] == results["seed-b"]["metrics"]
    # After all of it (sys:exit included) the site still trains an honest round, at its own delta.
    honest = results["honest-after"]
    assert honest["error"] is None, honest
    assert honest["metrics"][P.DELTA] == 1e-5 and 0 < honest["metrics"][P.EPSILON] <= MAX_EPSILON

    # 3. The site's ledger: one honest round charged at the site's terms, the over-budget one recorded as refused.
    ledger = PrivacyLedger.load(state / LEDGER_FILE)
    assert (ledger.accountant, ledger.delta, ledger.budget) == ("prv", 1e-5, MAX_EPSILON)
    assert len(ledger.rounds) == 1 and ledger.epsilon <= MAX_EPSILON
    assert ledger.epsilon == pytest.approx(honest["metrics"][P.EPSILON])
    assert ledger.refused, "the over-budget round is on record"
