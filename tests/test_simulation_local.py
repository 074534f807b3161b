"""``fedshield simulate`` keeps its Ray on 127.0.0.1 and takes every Ray process with it when it is SIGKILLed.

One real simulation (the CLI in its own process, Ray started by Flower's simulation engine): once round 1 is done,
every TCP socket that a process of the run listens on (read from ``/proc/<pid>/fd`` and ``/proc/net/tcp(6)``, as
``ss -ltnp`` does) must be on a loopback address; then the CLI alone is SIGKILLed and every process it started
(GCS, raylet, workers, the actors running the ClientApps) must be gone within a bounded wait.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import struct
import time
from pathlib import Path

import pytest
from _processes import Cli, alive

from fedshield.deploy.process import live_descendants

pytestmark = pytest.mark.usefixtures("no_leftover_processes")


def _listening_sockets() -> dict[int, str]:
    """``socket inode -> address`` of every TCP socket in LISTEN state on this host."""
    found: dict[int, str] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":
                continue
            host_hex, port_hex = fields[1].split(":")
            if len(host_hex) == 8:
                ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(
                    struct.pack("=I", int(host_hex, 16))
                )
            else:
                words = [int(host_hex[i : i + 8], 16) for i in range(0, 32, 8)]
                ip = ipaddress.IPv6Address(struct.pack("=4I", *words))
            found[int(fields[9])] = f"{ip}:{int(port_hex, 16)}"
    return found


def _listeners(pids: list[int]) -> dict[str, str]:
    """``address -> process`` for every TCP socket that one of ``pids`` listens on."""
    sockets = _listening_sockets()
    found = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue  # exited while we looked
        for link in links:
            if link.startswith("socket:[") and int(link[8:-1]) in sockets:
                found[sockets[int(link[8:-1])]] = f"{name} ({pid})"
    return found


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def test_simulation_ray_listens_on_loopback_only_and_dies_with_the_cli(tmp_path: Path) -> None:
    sim = Cli.start(["simulate", "--clients", "2", "--rounds", "40", "--no-dp", "--no-secagg", "--seed", "1",
                     "--out", str(tmp_path / "run")], tmp_path / "simulate.out")  # fmt: skip
    tree: list[int] = []
    try:
        sim.wait_for(r"round\s+1/40", timeout=240)
        tree = live_descendants(sim.proc.pid)
        listeners = _listeners([sim.proc.pid, *tree])
        assert any("gcs_server" in who for who in listeners.values()), listeners  # Ray runs, and we see it
        exposed = {addr: who for addr, who in listeners.items() if not _loopback(addr)}
        assert not exposed, f"Ray listens beyond loopback: {exposed}"
        os.kill(sim.proc.pid, signal.SIGKILL)  # only the CLI: Ray must follow by itself
        sim.proc.wait(timeout=30)
        deadline = time.monotonic() + 60
        while (left := [p for p in tree if alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"Ray processes outlived the simulation: {left}"
    finally:
        if sim.proc.poll() is None:
            sim.kill()
        for pid in tree:  # a failed run must not leave its orphans behind either
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
