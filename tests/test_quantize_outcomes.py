"""Compressed updates without SecAgg+, in a real simulation: every client's outcome and privacy charge lands on
that client. (DequantizeUpdates used to rebuild each reply as a message from the ServerApp's own node, so the
report said 1 client trained and N-1 failed, and credited every round to one client.)"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

import _sim_batch as sim_batch
from fedshield.config import RunConfig
from fedshield.server.report import recompute_epsilon

pytestmark = sim_batch.TIMEOUT
CLIENTS, ROUNDS = 3, 2


for _bits in (8, 16):  # 8- and 16-bit updates in clear, with DP-SGD: in the shared simulation of the 3-client tests
    sim_batch.register(f"quantize/q{_bits}", lambda root, b=_bits: RunConfig(
        task="digits", num_clients=CLIENTS, num_rounds=ROUNDS, local_epochs=1, secagg=False, quantize=b,
        out=root / f"quantize-q{b}"), clients=CLIENTS)


@pytest.fixture(scope="module")
def quantized_runs(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, RunConfig]:
    return sim_batch.results(tmp_path_factory, clients=CLIENTS).view("quantize/")


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bits", [8, 16])
def test_every_client_is_counted_as_trained(quantized_runs: Mapping[str, RunConfig], bits: int) -> None:
    rows = _rows(quantized_runs[f"q{bits}"].out)
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert (r["clients_sampled"], r["clients_trained"], r["clients_failed"]) == (CLIENTS, CLIENTS, 0), r
        assert r["failed"] == [] and r["rejected"] == []


@pytest.mark.parametrize("bits", [8, 16])
def test_every_client_is_charged_for_its_own_rounds(quantized_runs: Mapping[str, RunConfig], bits: int) -> None:
    privacy = json.loads((quantized_runs[f"q{bits}"].out / "privacy.json").read_text())
    clients = privacy["clients"]
    assert sorted(clients) == [f"client-{i}" for i in range(CLIENTS)]
    assert len({c["node_id"] for c in clients.values()}) == CLIENTS  # each under its own node
    epsilons = set()
    for name, c in clients.items():
        assert c["rounds_trained"] == ROUNDS and c["trained_in_rounds"] == [1, 2], (name, c)
        assert c["failures"] == [] and c["charged_unconfirmed"] == []
        assert c["epsilon_source"] == "history" and c["epsilon"] == pytest.approx(recompute_epsilon(c))
        epsilons.add(round(c["epsilon"], 9))
    assert len(epsilons) == 1  # same mechanism, same rounds: the same epsilon for all three
    assert privacy["guarantee"]["epsilon"] == pytest.approx(epsilons.pop())
