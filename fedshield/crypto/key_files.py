"""The files of a key directory: names, formats, modes, and the helpers that read and write them.

One directory holds a whole federation's key material::

    ca.pem                  CA certificate: every SuperNode gets a copy to verify the SuperLink (--root-certificates)
    ca.key                  CA private key: only needed to re-issue server.pem; keep it offline
    server.pem, server.key  SuperLink certificate (signed by the CA, SANs for every server host) and its key
    node-1.key, node-1.pub  one key pair per SuperNode: the .key goes to that site only, the .pub is registered
    authorized-nodes.txt    ``<ecdsa public key> <name>`` per line: the nodes the SuperLink registers

Formats are the ones Flower 1.39 accepts: node keys are ECDSA on NIST P-384 in OpenSSH format (Flower rejects
Ed25519 for node authentication); server keys are unencrypted PKCS#8 PEM because gRPC and uvicorn read them without
a passphrase. Private keys are written with mode 0600 through :mod:`fedshield.atomic`, so a crash never leaves half
a key behind, and existing material is never overwritten unless the caller says ``force=True``.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedshield.atomic import atomic_write_bytes
from fedshield.errors import KeyMaterialError

__all__ = [
    "read_bytes",
    "AUTHORIZED_NODES",
    "CA_CERT",
    "CA_KEY",
    "CURVE",
    "HASH",
    "KeySet",
    "NIST_CURVES",
    "NODE_NAME",
    "NodeCredentials",
    "NodeKey",
    "PRIVATE_MODE",
    "SERVER_CERT",
    "SERVER_KEY",
    "authorized_text",
    "check_nist_ec",
    "check_node_name",
    "check_public_line",
    "next_node_name",
    "node_paths",
    "openssh_public",
    "pkcs8",
    "read_authorized",
    "refuse_existing",
    "remove_existing_set",
    "set_paths",
    "utc_now",
    "write_node_files",
    "write_private",
    "write_public",
]


CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
AUTHORIZED_NODES = "authorized-nodes.txt"
CURVE = ec.SECP384R1()
HASH = hashes.SHA384()
NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PRIVATE_MODE = 0o600


@dataclass(frozen=True)
class NodeKey:
    """One authorized SuperNode: its name, OpenSSH public key line, and key files present in the directory."""

    name: str
    public_key: str
    private_key_path: Path | None
    public_key_path: Path | None


@dataclass(frozen=True)
class KeySet:
    """A validated key directory: every path exists and the certificates and keys belong together."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    authorized_nodes: Path
    nodes: tuple[NodeKey, ...]
    server_hosts: tuple[str, ...]

    def node(self, name: str) -> NodeKey:
        """Return the node called ``name``; unknown names fail listing the known ones."""
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes) or "none"
        raise KeyMaterialError(
            f"No node named {name!r} in {self.authorized_nodes} (known: {known}); "
            f"run `fedshield keys add-node --keys {self.directory} --name {name}`."
        )


@dataclass(frozen=True)
class NodeCredentials:
    """What one SuperNode needs on its own machine: the CA to trust and its private key (checked)."""

    ca_cert: Path
    private_key: Path
    public_key: str


def openssh_public(key: ec.EllipticCurvePrivateKey) -> str:
    public = key.public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def node_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.key", directory / f"{name}.pub"


def set_paths(out: Path, names: Iterable[str]) -> list[Path]:
    paths = [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY, out / AUTHORIZED_NODES]
    for name in names:
        paths.extend(node_paths(out, name))
    return paths


def refuse_existing(paths: Iterable[Path], *, hint: str) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise KeyMaterialError(f"Refusing to overwrite existing key material {path}; {hint}.")


def remove_existing_set(out: Path) -> None:
    """With force: drop the old set, including nodes added later, so no stale key looks authorized."""
    names: list[str] = []
    authorized = out / AUTHORIZED_NODES
    if authorized.is_file():
        try:
            names = [name for name, _ in read_authorized(authorized)]
        except KeyMaterialError:
            names = []
    names += [p.stem for p in out.glob("node-*.key")] + [p.stem for p in out.glob("node-*.pub")]
    for path in set_paths(out, dict.fromkeys(names)):
        path.unlink(missing_ok=True)


def write_node_files(directory: Path, name: str, key: ec.EllipticCurvePrivateKey) -> None:
    key_path, pub_path = node_paths(directory, name)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    write_private(key_path, private)
    write_public(pub_path, f"{openssh_public(key)} {name}\n".encode())


def write_private(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=PRIVATE_MODE)


def write_public(path: Path, data: bytes | str) -> None:
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data, mode=0o644)


def authorized_text(entries: Iterable[tuple[str, str]]) -> str:
    header = "# fedshield authorized SuperNodes: <ecdsa public key> <name>, one per line\n"
    return header + "".join(f"{key} {name}\n" for name, key in entries)


def next_node_name(existing: Sequence[str]) -> str:
    numbers = [int(m.group(1)) for n in existing if (m := re.fullmatch(r"node-(\d+)", n))]
    return f"node-{max(numbers, default=0) + 1}"


def check_node_name(name: str) -> str:
    if not isinstance(name, str) or not NODE_NAME.match(name):
        raise KeyMaterialError(
            f"Node name {name!r} is not usable as a file name; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. hospital-a)."
        )
    return name


def check_public_line(line: str, where: str) -> str:
    try:
        public = serialization.load_ssh_public_key(line.encode())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise KeyMaterialError(
            f"{where}: not an OpenSSH public key ({err}); regenerate it with `fedshield keys add-node`."
        ) from err
    check_nist_ec(public, Path(where))
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def read_authorized(path: Path) -> list[tuple[str, str]]:
    """Parse ``<type> <base64> <name>`` lines; returns (name, "<type> <base64>") pairs, names unique."""
    text = read_bytes(path, "authorized nodes list").decode("utf-8", errors="replace")
    entries: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3:
            raise KeyMaterialError(
                f"{path}:{number}: expected '<key type> <base64 key> <name>', got {len(parts)} fields; "
                "fix the line or regenerate it with `fedshield keys add-node`."
            )
        key_type, blob, name = parts
        check_node_name(name)
        if name in (n for n, _ in entries):
            raise KeyMaterialError(f"{path}:{number}: node name {name!r} appears twice; keep one line per node.")
        entries.append((name, check_public_line(f"{key_type} {blob}", f"{path}:{number}")))
    return entries


def check_nist_ec(key: object, path: Path) -> None:
    """Flower 1.39 node authentication takes only EC keys on NIST curves; Ed25519 and RSA are refused."""
    is_ec = isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey))
    if not is_ec or not isinstance(getattr(key, "curve", None), NIST_CURVES):
        raise KeyMaterialError(
            f"{path}: got {type(key).__name__}, but Flower node authentication needs ECDSA on a NIST curve; "
            "make one with `fedshield keys add-node` (or `ssh-keygen -t ecdsa -b 384`)."
        )


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def read_bytes(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise KeyMaterialError(
            f"Missing {what} {path}; copy it from the directory made by `fedshield keys init`, or re-run it."
        )
    try:
        return path.read_bytes()
    except OSError as err:
        raise KeyMaterialError(f"Cannot read {what} {path} ({err.strerror}); check its owner and mode.") from err
