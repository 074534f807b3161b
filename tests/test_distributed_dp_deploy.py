"""--dp-mode distributed with real processes: `fedshield server` and three `fedshield client` sites (real TLS,
signed SecAgg+ keys, rosters) run two distributed rounds; a site whose policy demands more honest sites than the
round assumes refuses it; epsilon recomputes from privacy.json and the sites' distributed ledgers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _processes import Cli, digits_sites

from fedshield.crypto import KeySet, init_keys
from fedshield.deploy import free_port
from fedshield.privacy.skellam_accountant import epsilon as skellam_epsilon
from fedshield.privacy.skellam_ledger import SKELLAM_LEDGER_FILE, load_history
from fedshield.server.report import recompute_epsilon

# Slow (deployment rounds start a process per message): 13.6 min under a load average of ~40 (not measured alone).
# Fast tests cover the same behaviour: test_distributed_dp.py (real engine, real SecAgg+; the site policy and
# UNMASK refusals).
pytestmark = [pytest.mark.usefixtures("no_leftover_processes"), pytest.mark.timeout(1500), pytest.mark.slow]
SITES = 3


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return init_keys(tmp_path_factory.mktemp("keys") / "keys", server_hosts=["127.0.0.1"], nodes=SITES)


def test_three_real_sites_run_distributed_rounds_and_a_strict_site_refuses(keys: KeySet, tmp_path: Path) -> None:
    (tmp_path / "sites").mkdir()
    sites = digits_sites(tmp_path / "sites", SITES)
    fleet, out, started = f"127.0.0.1:{free_port()}", tmp_path / "run", []
    try:
        server = Cli.start(["server", "--keys", str(keys.directory), "--address", fleet, "--control-port",
                            str(free_port()), "--rounds", "2", "--min-clients", str(SITES), "--out", str(out),
                            "--dp-mode", "distributed", "--local-epochs", "1", "--sample-rate", "0.1",
                            "--min-honest", "2", "--ddp-records", "1000", "--seed", "3"], tmp_path / "server.out")
        started.append(server)
        server.wait_for(r"registered nodes: node-1, node-2, node-3", timeout=300)
        clients = []
        for i, data in enumerate(sites, 1):
            strict = ["--min-honest", "1"] if i == 3 else []  # this site relies on itself alone; the round assumes 2
            clients.append(Cli.start(
                ["client", "--server", fleet, "--ca", str(keys.ca_cert), "--node-key",
                 str(keys.node(f"node-{i}").private_key_path), "--roster", str(keys.authorized_nodes), "--data",
                 str(data), "--state", str(tmp_path / f"state-{i}"), *strict], tmp_path / f"client-{i}.out"))
            started.append(clients[-1])
        assert server.proc.wait(timeout=900) == 0, server.text()
    finally:
        for cli in started:
            cli.interrupt()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_trained"] for r in rows] == [2, 2], rows  # the strict site refused both rounds
    privacy = json.loads((out / "privacy.json").read_text())
    assert privacy["distributed"]["min_honest"] == 2
    refusals = [f["reason"] for c in privacy["clients"].values() for f in c["failures"]]
    assert refusals and all("fedshield:policy-refused: min-honest" in r for r in refusals), refusals
    assert not (tmp_path / "state-3" / SKELLAM_LEDGER_FILE).exists()  # refused before charging
    for i in (1, 2):
        delta, history, rounds = load_history(tmp_path / f"state-{i}" / SKELLAM_LEDGER_FILE)
        assert len(rounds) == 2
        (entry,) = [c for c in privacy["clients"].values() if c["rounds_trained"] == 2 and
                    c["epsilon"] == pytest.approx(skellam_epsilon(history, delta=delta), rel=1e-9)][:1]
        assert entry["epsilon"] == pytest.approx(recompute_epsilon(entry), rel=1e-9)
        assert 0 < entry["epsilon"] <= 8.0 + 1e-6
