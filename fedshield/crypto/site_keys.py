"""Node keys a site makes on its own machine, and how the coordinator authorizes them without ever holding them.

``fedshield keys init --nodes N`` makes every site's private key on the coordinator (tests and demos): that
coordinator could then sign SecAgg+ keys as any site, so a signature would prove nothing against it. Here the site
runs :func:`make_site_key`, sends only the ``.pub``, and the coordinator appends it to ``authorized-nodes.txt``
with :func:`add_site_public_key`. Sites compare the roster's fingerprints among themselves out of band.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedshield.errors import KeyMaterialError

from .key_files import (
    CURVE,
    authorized_text,
    check_node_name,
    check_public_line,
    next_node_name,
    node_paths,
    refuse_existing,
    write_node_files,
    write_public,
)
from .key_loading import load_keyset
from .secagg_auth import fingerprint

__all__ = ["add_site_public_key", "make_site_key"]


def make_site_key(out: Path, *, name: str) -> tuple[Path, str]:
    """Make this site's node key pair in ``out`` (``NAME.key`` mode 0600, ``NAME.pub``); returns the .pub path and
    the key's ``SHA256:`` fingerprint. Refuses to overwrite an existing key."""
    name = check_node_name(name)
    key_path, pub_path = node_paths(Path(out), name)
    refuse_existing([key_path, pub_path], hint="choose another --name, or move the old key away first")
    key = ec.generate_private_key(CURVE)
    write_node_files(Path(out), name, key)
    return pub_path, fingerprint(key.public_key())


def add_site_public_key(keys_dir: Path, *, name: str | None, public_key: str) -> Path:
    """Authorize a site's own public key (a ``.pub`` line) in ``keys_dir``; returns the ``.pub`` written there.

    Raises KeyMaterialError for a malformed or non-NIST-EC key, or a name or key already authorized.
    """
    keyset = load_keyset(keys_dir)
    existing = [n.name for n in keyset.nodes]
    name = next_node_name(existing) if name is None else check_node_name(name)
    line = check_public_line(" ".join(public_key.split()[:2]), "--public-key")
    if name in existing or line in (n.public_key for n in keyset.nodes):
        raise KeyMaterialError(f"{name!r} or this public key is already in {keyset.authorized_nodes}; "
                               "choose another --name, or check which site sent this .pub")
    _, pub_path = node_paths(keyset.directory, name)
    refuse_existing([pub_path], hint="choose another --name, or delete the stray file")
    write_public(pub_path, f"{line} {name}\n")
    entries = [(n.name, n.public_key) for n in keyset.nodes] + [(name, line)]
    write_public(keyset.authorized_nodes, authorized_text(entries))
    return pub_path
