"""``fedshield simulate`` keeps its Ray on 127.0.0.1 and takes every Ray process with it when it is SIGKILLed.

One real simulation (the CLI in its own process, Ray started by Flower's simulation engine): once round 1 is done,
every TCP socket that a process of the run listens on (read from ``/proc/<pid>/fd`` and ``/proc/net/tcp(6)``, as
``ss -ltnp`` does) must be on a loopback address; then the CLI alone is SIGKILLed and every process it started
(GCS, raylet, workers, the actors running the ClientApps) must be gone within a bounded wait.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from _listeners import listeners, loopback
from _processes import alive, long_simulation, still_alive_after

from fedshield.deploy.process import live_descendants

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def test_simulation_ray_listens_on_loopback_only_and_dies_with_the_cli(tmp_path: Path) -> None:
    sim = long_simulation(tmp_path, "ray")
    tree: list[int] = []
    try:
        sim.wait_for(r"round\s+1/40", timeout=240)
        tree = live_descendants(sim.proc.pid)
        found = listeners([sim.proc.pid, *tree])
        assert any("gcs_server" in who for who in found.values()), found  # Ray runs, and we see it
        exposed = {addr: who for addr, who in found.items() if not loopback(addr)}
        assert not exposed, f"Ray listens beyond loopback: {exposed}"
        os.kill(sim.proc.pid, signal.SIGKILL)  # only the CLI: Ray must follow by itself
        sim.proc.wait(timeout=30)
        left = still_alive_after(tree, 60)
        assert not left, f"Ray processes outlived the simulation: {left}"
    finally:
        if sim.proc.poll() is None:
            sim.kill()
        for pid in tree:  # a failed run must not leave its orphans behind either
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
