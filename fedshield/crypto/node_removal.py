"""``fedshield keys remove-node``: take a SuperNode's key out of the federation's key directory.

The entry leaves ``authorized-nodes.txt`` and the node's key files are deleted, so no later ``keys init --force``
or copy of the directory can re-authorize it by accident. The running SuperLink still holds the registration in
its database until ``fedshield server`` starts again, which unregisters every stored node the list no longer
names (:func:`fedshield.deploy.revocation.revoke_unlisted`).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import KeyMaterialError
from .key_files import authorized_text, node_paths, write_public
from .key_loading import load_keyset

__all__ = ["remove_node"]


def remove_node(keys_dir: Path, name: str) -> list[Path]:
    """Remove node ``name`` from ``keys_dir``; returns the key files deleted (its .key and .pub, where present)."""
    keyset = load_keyset(keys_dir)
    names = [n.name for n in keyset.nodes]
    if name not in names:
        raise KeyMaterialError(f"no node named {name!r} in {keyset.authorized_nodes} (known: "
                               f"{', '.join(names) or 'none'}); `fedshield keys remove-node` takes one of those names")
    entries = [(n.name, n.public_key) for n in keyset.nodes if n.name != name]
    write_public(keyset.authorized_nodes, authorized_text(entries))
    deleted = []
    for path in node_paths(keyset.directory, name):
        if path.exists():
            path.unlink()
            deleted.append(path)
    return deleted
