"""Which TCP ports a set of processes listens on, read as ``ss -ltnp`` does: ``/proc/<pid>/fd`` socket inodes
matched against the LISTEN entries of ``/proc/net/tcp`` and ``/proc/net/tcp6``."""

from __future__ import annotations

import ipaddress
import os
import struct
from pathlib import Path

__all__ = ["listeners", "loopback"]


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
                ip = ip.ipv4_mapped or ip  # gRPC listens on 127.0.0.1 through an IPv6 socket
            found[int(fields[9])] = f"{ip}:{int(port_hex, 16)}"
    return found


def listeners(pids: list[int]) -> dict[str, str]:
    """``address -> process`` for every TCP socket that one of ``pids`` listens on."""
    sockets = _listening_sockets()
    found = {}
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue  # exited while we looked
        for link in _links(fds):
            if link.startswith("socket:[") and int(link[8:-1]) in sockets:
                found[sockets[int(link[8:-1])]] = f"{name} ({pid})"
    return found


def _links(fds: list[Path]) -> list[str]:
    """What each descriptor points at. A busy process (gRPC, SQLite) opens and closes descriptors while we read:
    one that closed between the listing and its ``readlink`` is skipped, not the whole process."""
    links = []
    for fd in fds:
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return links


def loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.rsplit(":", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback
