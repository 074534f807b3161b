"""fedshield's one-walk dispatch for Flower's simulation engine hands out exactly what Flower's per-node loop does,
sweep after sweep, on a real ``InMemoryLinkState``; it drops expired messages as Flower does; it is swapped in only
while a simulation runs; and a test fails if the Flower function it replaces changes."""

from __future__ import annotations

import time
from types import ModuleType

import pytest
from flwr.server.superlink.fleet.vce import vce_api

from _benchmarks import load_benchmark

from fedshield.simulation import dispatch

pytestmark = pytest.mark.usefixtures("restored_task_identity")


def _bench() -> ModuleType:
    return load_benchmark("sim_dispatch")


def _delivered(messages: list) -> list[tuple[int, int]]:  # type: ignore[type-arg]
    return sorted((m.metadata.dst_node_id, int(m.content["c"]["i"])) for m in messages)


@pytest.mark.parametrize(("nodes", "messages"), [(7, 30), (40, 25), (1, 3)])
def test_one_walk_delivers_what_flowers_per_node_loop_delivers(nodes: int, messages: int) -> None:
    """Several messages per node, nodes with none: each sweep gives at most one per node, the oldest first."""
    bench = _bench()
    ours_state, ours_nodes = bench.build_state(nodes, messages)
    flower_state, flower_nodes = bench.build_state(nodes, messages)
    node_rank = {nid: i for i, nid in enumerate(ours_nodes)}, {nid: i for i, nid in enumerate(flower_nodes)}
    sweeps = 0
    while True:
        ours = dispatch.take_undelivered(ours_state, ours_nodes)
        flower = bench.flower_sweep(flower_state, flower_nodes)
        # Node ids are random per state: compare by each node's registration rank.
        assert sorted((node_rank[0][d], i) for d, i in _delivered(ours)) == \
            sorted((node_rank[1][d], i) for d, i in _delivered(flower))
        assert len({m.metadata.dst_node_id for m in ours}) == len(ours)
        assert all(m.metadata.delivered_at for m in ours)
        if not ours:
            break
        sweeps += 1
    assert sweeps == -(-messages // nodes)  # one message per node per sweep


def test_expired_messages_are_dropped_not_delivered() -> None:
    bench = _bench()
    state, nodes = bench.build_state(5, 5, ttl=0.05)
    time.sleep(0.1)
    assert dispatch.take_undelivered(state, nodes) == []
    assert not state.message_ins_store  # deleted, as Flower's _check_stored_messages does


def test_only_the_listed_nodes_get_messages() -> None:
    bench = _bench()
    state, nodes = bench.build_state(6, 6)
    some = dict(list(nodes.items())[:2])
    assert {m.metadata.dst_node_id for m in dispatch.take_undelivered(state, some)} == set(some)
    assert len(dispatch.take_undelivered(state, nodes)) == 4


def test_swapped_in_only_inside_the_block() -> None:
    flower = vce_api.add_messages_to_queue
    with dispatch.one_pass_dispatch():
        assert vce_api.add_messages_to_queue is dispatch._add_messages_to_queue
    assert vce_api.add_messages_to_queue is flower
    with pytest.raises(RuntimeError), dispatch.one_pass_dispatch():
        raise RuntimeError("a failed simulation")
    assert vce_api.add_messages_to_queue is flower
