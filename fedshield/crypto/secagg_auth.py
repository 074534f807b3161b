"""Authenticated SecAgg+ public keys: each site signs its two round keys with its node key, every peer checks them
against a roster of authorized node public keys it was handed out of band.

Why: in SecAgg+ the server relays every public key. Unsigned, a malicious server can hand site A key pairs of its
own in place of the other sites' keys: A then derives its pairwise masks with, and encrypts the shares of its
secrets to, keys the server holds, and the server unmasks A's update. A signature by B's node key over B's round keys, checked
against a roster the server cannot edit, makes a substituted key detectable.

What is signed (:func:`signed_payload`): a domain tag, the run id, the round tag (the message's group id, the
server round), the signer's node id, the stage, and both public keys, each length-prefixed, so a signature cannot be
replayed into another run, round, node id or stage. ECDSA with SHA-384 on the node key's curve (NIST P-384 from
``fedshield keys``; Flower's node authentication takes only NIST curves).

The trust sits in the roster. If the coordinator generated every site's private key (``fedshield keys init
--nodes N``, for tests and demos) it can sign anything; in production each site makes its own key
(``fedshield keys site-key``), sends only the ``.pub``, and sites compare roster fingerprints
(:func:`fingerprint`, as ``ssh-keygen -l`` prints them) among themselves out of band.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedshield.errors import KeyMaterialError, ProtocolError

__all__ = [
    "DEFAULT_MIN_PEERS",
    "KeyAuthenticationError",
    "Roster",
    "RosterEntry",
    "SignedKeys",
    "check_participants",
    "fingerprint",
    "load_roster",
    "sign_round_keys",
    "signed_payload",
]

#: Fewest OTHER signed participants a site accepts in a round: with one, the server learns that site's update
#: exactly (sum minus its own); the site policy may raise it.
DEFAULT_MIN_PEERS: Final = 2

_TAG: Final = b"fedshield/secagg+/round-keys/v1"
_NIST: Final = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


class KeyAuthenticationError(ProtocolError):
    """A SecAgg+ participant's keys are not signed by an authorized node key for this run, round and node."""


@dataclass(frozen=True)
class RosterEntry:
    """One authorized node public key, as the roster file names it."""

    name: str
    fingerprint: str
    public_key: ec.EllipticCurvePublicKey


@dataclass(frozen=True)
class Roster:
    """The authorized node public keys by fingerprint; loaded from a file the server never touches."""

    source: str
    entries: Mapping[str, RosterEntry]

    def __len__(self) -> int:
        return len(self.entries)


@dataclass(frozen=True)
class SignedKeys:
    """One participant's round keys as relayed by the server: both public keys, its signature and signer."""

    pk1: bytes
    pk2: bytes
    signature: bytes
    signer: str  # fingerprint of the node key that signed


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:<base64>`` of the OpenSSH key blob: the string ``ssh-keygen -l -f KEY.pub`` prints."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load_roster(path: Path) -> Roster:
    """Read ``<ecdsa key type> <base64> [name]`` lines (``authorized-nodes.txt`` and ``.pub`` files have this form).

    Raises KeyMaterialError naming the line and the fix for a malformed or non-NIST-EC key, a duplicate key, or an
    empty roster.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise KeyMaterialError(f"cannot read the SecAgg+ roster {path} ({err.strerror}): pass --roster with the "
                               "authorized-nodes.txt your coordinator sent (fingerprints checked with the other sites)"
                               ) from err
    entries: dict[str, RosterEntry] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        entry = _parse_line(line, f"{path}:{number}", default_name=f"line-{number}")
        if entry.fingerprint in entries:
            raise KeyMaterialError(f"{path}:{number}: the key {entry.fingerprint} is listed twice (also as "
                                   f"{entries[entry.fingerprint].name!r}); keep one line per site")
        entries[entry.fingerprint] = entry
    if not entries:
        raise KeyMaterialError(f"the SecAgg+ roster {path} lists no node keys: use the coordinator's "
                               "authorized-nodes.txt, one '<ecdsa key> <name>' line per site")
    return Roster(str(path), entries)


def _parse_line(line: str, where: str, *, default_name: str) -> RosterEntry:
    parts = line.split()
    if len(parts) < 2:
        raise KeyMaterialError(f"{where}: expected '<key type> <base64 key> [name]'; fix or delete the line")
    try:
        public = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise KeyMaterialError(f"{where}: not an OpenSSH public key ({err}); copy the site's .pub line") from err
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(public.curve, _NIST):
        raise KeyMaterialError(f"{where}: {type(public).__name__} is not ECDSA on a NIST curve; node keys come from "
                               "`fedshield keys site-key` (or `ssh-keygen -t ecdsa -b 384`)")
    name = parts[2] if len(parts) > 2 else default_name
    return RosterEntry(name, fingerprint(public), public)


def signed_payload(*, run_id: int, round_tag: str, node_id: int, stage: str, pk1: bytes, pk2: bytes) -> bytes:
    """The exact bytes a site signs for its round keys; each field length-prefixed so none can bleed into another."""
    fields = [_TAG, str(int(run_id)).encode(), round_tag.encode(), str(int(node_id)).encode(), stage.encode(),
              pk1, pk2]
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def sign_round_keys(key: ec.EllipticCurvePrivateKey, payload: bytes) -> tuple[bytes, str]:
    """Sign ``payload`` (from :func:`signed_payload`); returns the DER signature and the signer's fingerprint."""
    return key.sign(payload, ec.ECDSA(hashes.SHA384())), fingerprint(key.public_key())


def check_participants(
    roster: Roster,
    keys: Mapping[int, SignedKeys],
    *,
    own_node_id: int,
    run_id: int,
    round_tag: str,
    stage: str,
    min_peers: int = DEFAULT_MIN_PEERS,
) -> dict[int, str]:
    """Check every participant's signed keys; return node id -> roster name, or raise KeyAuthenticationError.

    Refused: a signer not in the roster, a signature that does not verify for this run/round/node/stage and these
    keys, one roster key behind two node ids (one site posing as several, or the server replaying), and fewer than
    ``min_peers`` distinct signed participants besides ``own_node_id``.
    """
    names: dict[int, str] = {}
    seen: dict[str, int] = {}
    for nid in sorted(keys):
        entry = keys[nid]
        authorized = roster.entries.get(entry.signer)
        if authorized is None:
            raise KeyAuthenticationError(f"node {nid}'s keys are signed by {entry.signer or 'nobody'}, which is not in "
                                         f"the roster {roster.source}")
        if entry.signer in seen:
            raise KeyAuthenticationError(f"roster key {authorized.name!r} ({entry.signer}) signs for two node ids, "
                                         f"{seen[entry.signer]} and {nid}, in one round")
        payload = signed_payload(run_id=run_id, round_tag=round_tag, node_id=nid, stage=stage,
                                 pk1=entry.pk1, pk2=entry.pk2)
        try:
            authorized.public_key.verify(entry.signature, payload, ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise KeyAuthenticationError(
                f"node {nid}'s keys do not verify under roster key {authorized.name!r}: substituted keys, or a "
                f"signature made for another run, round or node id (this is run {run_id}, round {round_tag})"
            ) from None
        seen[entry.signer] = nid
        names[nid] = authorized.name
    peers = len(names) - (own_node_id in names)
    if peers < min_peers:
        raise KeyAuthenticationError(f"only {peers} other signed participant(s) in this round, fewer than this "
                                     f"site's minimum of {min_peers}: the server could isolate this site's update (a federation of "
                                     f"fewer sites starts each client with --secagg-min-peers {max(1, peers)})")
    return names
