"""Revocation: at every start the SuperLink keeps only the nodes ``authorized-nodes.txt`` lists.

Node registrations live in the SuperLink's database and survive restarts (that is what lets ``fedshield server``
restart without re-admitting every site by hand). So removing a key from ``authorized-nodes.txt``
(``fedshield keys remove-node``) would change nothing by itself: the stored registration would still admit the
key. Here every stored node whose public key is not in the list is unregistered through the Control API, before
any run is submitted; Flower then refuses that key (code 2004) until it is registered again.
"""

from __future__ import annotations

import logging

from cryptography.hazmat.primitives import serialization

from ..crypto import KeySet
from .superlink import SuperLink

__all__ = ["revoke_unlisted"]

_log = logging.getLogger(__name__)

#: Status Flower 1.39 gives a node after UnregisterNode; such a node is already refused.
_UNREGISTERED = "unregistered"


def revoke_unlisted(superlink: SuperLink, keyset: KeySet) -> list[int]:
    """Unregister every stored node whose key ``keyset`` does not authorize; returns their node IDs."""
    allowed = {_pem(node.public_key) for node in keyset.nodes}
    revoked = []
    for node in superlink.stored_nodes():
        if node.status == _UNREGISTERED or _normalize_pem(node.public_key_pem) in allowed:
            continue
        superlink.unregister_node(node.node_id)
        _log.warning("unregistered node %d: its key is no longer in %s", node.node_id, keyset.authorized_nodes)
        revoked.append(node.node_id)
    return revoked


def _pem(openssh_line: str) -> str:
    """An authorized OpenSSH public key line in the PEM form Flower stores (SubjectPublicKeyInfo)."""
    key = serialization.load_ssh_public_key(openssh_line.encode("ascii"))
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


def _normalize_pem(pem: str) -> str:
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except ValueError:
        return pem  # not a key we could have authorized: it never matches, so it is revoked
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")
