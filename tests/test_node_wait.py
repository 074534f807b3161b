"""The ServerApp's bounded wait for the run's clients (the real-process case is in tests/test_flwr_run.py)."""

from __future__ import annotations

import pytest

from fedshield.server.nodes import NodeWaitTimeout, wait_for_nodes

from _grid import FakeGrid


class _Clock:
    """Time that moves only when the waiter sleeps, so the test takes no wall time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_returns_at_once_when_enough_nodes_are_connected() -> None:
    clock = _Clock()
    assert wait_for_nodes(FakeGrid(5), 5, timeout=10, clock=clock, sleep=clock.sleep) == 5
    assert clock.slept == []


def test_waits_for_nodes_that_come_late() -> None:
    grid, clock = FakeGrid(2), _Clock()

    def sleep(seconds: float) -> None:
        clock.sleep(seconds)
        if clock.now >= 3:
            grid.ids = FakeGrid(5).ids

    assert wait_for_nodes(grid, 5, timeout=10, clock=clock, sleep=sleep) == 5
    assert 3 <= clock.now < 3.25  # found at the first look after they came


def test_the_first_looks_come_quickly_then_back_off_to_the_poll_interval() -> None:
    """Simulated nodes register within milliseconds: the first looks are 10 ms apart, doubling to ``poll``."""
    clock = _Clock()
    with pytest.raises(NodeWaitTimeout):
        wait_for_nodes(FakeGrid(2), 5, timeout=2, clock=clock, sleep=clock.sleep)
    assert clock.slept[:6] == [0.01, 0.02, 0.04, 0.08, 0.16, 0.25]
    assert set(clock.slept[6:-1]) == {0.25} and clock.slept[-1] <= 0.25


def test_stops_after_the_timeout_with_one_line_naming_both_fixes() -> None:
    clock = _Clock()
    with pytest.raises(NodeWaitTimeout) as info:
        wait_for_nodes(FakeGrid(2), 5, timeout=4, clock=clock, sleep=clock.sleep)
    assert clock.now == 4
    message = str(info.value)
    assert "\n" not in message
    assert message == ('only 2 of the 5 clients this run needs (num-clients) connected within node-wait-timeout = 4 s: '
                       'start 5 nodes (flwr run: --federation-config "num-supernodes=5"; fedshield server: start more '
                       'sites) or lower num-clients')
