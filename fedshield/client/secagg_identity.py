"""What a site authenticates SecAgg+ with: its node key and its roster, read from the node config only.

The node config is set by the site's own ``fedshield client`` (``--node-key``, ``--roster``, ``--secagg-min-peers``);
nothing the server sends can switch verification off. Without a roster (Flower's simulation engine, whose virtual
clients have no node keys, or a deployed client started with ``--insecure``) SecAgg+ runs unauthenticated, as in
Flower, but still with :mod:`fedshield.crypto.prg` masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from ..crypto.key_loading import load_node_key
from ..crypto.secagg_auth import DEFAULT_MIN_PEERS, Roster, load_roster
from ..errors import ConfigError
from .node_config import NODE_KEY, SECAGG_MIN_PEERS, SECAGG_ROSTER

__all__ = ["SiteIdentity", "site_identity"]


@dataclass(frozen=True)
class SiteIdentity:
    """This site's SecAgg+ authentication settings; ``roster`` None means unauthenticated (simulation/insecure)."""

    roster: Roster | None
    key: ec.EllipticCurvePrivateKey | None
    min_peers: int = DEFAULT_MIN_PEERS

    @property
    def verifies(self) -> bool:
        return self.roster is not None


def site_identity(node_config: Mapping[str, object]) -> SiteIdentity:
    """Load the roster and key the node config names; raises KeyMaterialError/ConfigError naming the fix."""
    roster_path = str(node_config.get(SECAGG_ROSTER, "") or "")
    key_path = str(node_config.get(NODE_KEY, "") or "")
    min_peers = _min_peers(node_config.get(SECAGG_MIN_PEERS, DEFAULT_MIN_PEERS))
    if not roster_path:
        return SiteIdentity(None, _key(key_path) if key_path else None, min_peers)
    if not key_path:
        raise ConfigError(f"node config has {SECAGG_ROSTER} but no {NODE_KEY}: this site could verify its peers but "
                          "not sign its own SecAgg+ keys; start `fedshield client` with --node-key")
    return SiteIdentity(_roster(roster_path), _key(key_path), min_peers)


# Read again whenever the file changed: a SuperNode answers SecAgg+ stages for as long as it runs
# (fedshield.deploy.node_stages), and an operator who edits the roster (a compromised peer removed, a site added)
# must not wait for a restart. The cache spares re-reading an unchanged file.
def _roster(path: str) -> Roster:
    return _roster_at(path, _version(path))


def _key(path: str) -> ec.EllipticCurvePrivateKey:
    return _key_at(path, _version(path))


def _version(path: str) -> tuple[int, int, int, int]:
    try:
        st = Path(path).stat()
    except OSError:
        return (-1, -1, -1, -1)  # the loader reports the missing file
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)


@lru_cache(maxsize=8)
def _roster_at(path: str, version: tuple[int, int, int, int]) -> Roster:
    return load_roster(Path(path))


@lru_cache(maxsize=8)
def _key_at(path: str, version: tuple[int, int, int, int]) -> ec.EllipticCurvePrivateKey:
    return load_node_key(Path(path))


def _min_peers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 1:
        raise ConfigError(f"{SECAGG_MIN_PEERS} must be a whole number >= 1, got {value!r}: e.g. 2")
    return int(value)
