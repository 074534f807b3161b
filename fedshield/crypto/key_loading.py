"""Load and cross-check key material: a whole key directory, a site's CA + node key, one node key.

Every check fails with :class:`~fedshield.errors.KeyMaterialError` naming the file and the fix, before Flower would
fail with a bare exit code after connecting.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedshield.errors import KeyMaterialError

from .key_files import (
    read_bytes, AUTHORIZED_NODES, CA_CERT, KeySet, NodeCredentials, NodeKey, SERVER_CERT, SERVER_KEY, check_nist_ec,
    check_public_line, node_paths, openssh_public, read_authorized, utc_now,
)

__all__ = ["load_keyset", "load_node_credentials", "load_node_key"]


def load_node_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The node private key at ``path`` (OpenSSH, NIST EC, mode 0600), checked as for node authentication."""
    return _load_node_private(Path(path))


def load_keyset(keys_dir: Path) -> KeySet:
    """Load and cross-check a key directory made by :func:`init_keys`.

    Raises :class:`~fedshield.errors.KeyMaterialError` naming the file and the fix when a file is missing or
    unreadable, a private key is readable by other users, the server certificate is not signed by ``ca.pem`` or is
    expired, a key does not match its certificate or public key, or ``authorized-nodes.txt`` is malformed.
    """
    directory = Path(keys_dir)
    if not directory.is_dir():
        raise KeyMaterialError(
            f"Key directory {directory} does not exist; create one with `fedshield keys init --out {directory}`."
        )
    ca_cert = _load_cert(directory / CA_CERT)
    _check_is_ca(ca_cert, directory / CA_CERT)
    server_cert = _load_cert(directory / SERVER_CERT)
    _check_issued_by(server_cert, directory / SERVER_CERT, ca_cert, directory / CA_CERT)
    _check_validity(server_cert, directory / SERVER_CERT)
    server_key = _load_pem_private(directory / SERVER_KEY)
    _check_key_matches(server_key, server_cert.public_key(), directory / SERVER_KEY, directory / SERVER_CERT)
    authorized = read_authorized(directory / AUTHORIZED_NODES)
    nodes = tuple(_load_node(directory, name, line) for name, line in authorized)
    return KeySet(
        directory=directory,
        ca_cert=directory / CA_CERT,
        server_cert=directory / SERVER_CERT,
        server_key=directory / SERVER_KEY,
        authorized_nodes=directory / AUTHORIZED_NODES,
        nodes=nodes,
        server_hosts=_san_hosts(server_cert),
    )


def load_node_credentials(*, ca_cert: Path, private_key: Path) -> NodeCredentials:
    """Check what a SuperNode site was given: a CA certificate and an ECDSA node key in OpenSSH format.

    Fails early with a fedshield message where Flower would exit with a bare code (305) after connecting.
    """
    ca = _load_cert(Path(ca_cert))
    _check_is_ca(ca, Path(ca_cert))
    key = _load_node_private(Path(private_key))
    return NodeCredentials(ca_cert=Path(ca_cert), private_key=Path(private_key), public_key=openssh_public(key))


def _load_cert(path: Path) -> x509.Certificate:
    data = read_bytes(path, "certificate")
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as err:
        raise KeyMaterialError(
            f"{path} is not a PEM certificate ({err}); restore it from the `fedshield keys init` output."
        ) from err


def _check_private_mode(path: Path) -> None:
    if os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyMaterialError(
            f"Private key {path} is readable by other users (mode {mode:04o}); run `chmod 600 {path}`."
        )


def _load_pem_private(path: Path) -> ec.EllipticCurvePrivateKey:
    data = read_bytes(path, "private key")
    _check_private_mode(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyMaterialError(
            f"{path} is not an unencrypted PEM private key ({err}); restore it from `fedshield keys init`."
        ) from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyMaterialError(
            f"{path} holds a {type(key).__name__}, expected an EC key; re-run `fedshield keys init`."
        )
    return key


def _load_node_private(path: Path) -> ec.EllipticCurvePrivateKey:
    data = read_bytes(path, "node private key")
    _check_private_mode(path)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyMaterialError(
            f"{path} is not an unencrypted OpenSSH private key ({err}); use the .key file from `fedshield keys`."
        ) from err
    check_nist_ec(key, path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):  # unreachable after the check; narrows the type
        raise KeyMaterialError(f"{path} is not an EC private key; use the .key file from `fedshield keys`.")
    return key


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        ca = False
    if not ca:
        raise KeyMaterialError(
            f"{path} is not a CA certificate (no CA:true); use the ca.pem from `fedshield keys init`."
        )


def _check_issued_by(cert: x509.Certificate, path: Path, ca: x509.Certificate, ca_path: Path) -> None:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise KeyMaterialError(
            f"{path} is not signed by {ca_path}; the two come from different `fedshield keys init` runs: "
            "copy both from the same key directory."
        ) from err


def _check_validity(cert: x509.Certificate, path: Path) -> None:
    now = utc_now()
    if now < cert.not_valid_before_utc:
        raise KeyMaterialError(
            f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d}; check this machine's clock."
        )
    if now > cert.not_valid_after_utc:
        raise KeyMaterialError(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            "issue new keys with `fedshield keys init --force`."
        )


def _check_key_matches(
    key: ec.EllipticCurvePrivateKey, public: object, key_path: Path, public_path: Path
) -> None:
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    other = public.public_bytes(*spki) if isinstance(public, ec.EllipticCurvePublicKey) else b""
    if key.public_key().public_bytes(*spki) != other:
        raise KeyMaterialError(
            f"Private key {key_path} does not match {public_path}; the files were swapped or come from different "
            "`fedshield keys` runs: restore the pair from one key directory."
        )


def _san_hosts(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return (*san.get_values_for_type(x509.DNSName), *ips)


def _load_node(directory: Path, name: str, public_line: str) -> NodeKey:
    """A node entry; its .key/.pub files are optional (a SuperLink host should hold only the list)."""
    key_path, pub_path = node_paths(directory, name)
    has_key, has_pub = key_path.exists(), pub_path.exists()
    if has_pub:
        pub_text = read_bytes(pub_path, "node public key").decode("utf-8", errors="replace").split()
        on_disk = check_public_line(" ".join(pub_text[:2]), str(pub_path))
        if on_disk != public_line:
            raise KeyMaterialError(
                f"{pub_path} does not match the entry for {name!r} in {directory / AUTHORIZED_NODES}; "
                "one of them was replaced: regenerate the node with `fedshield keys add-node`."
            )
    if has_key:
        key = _load_node_private(key_path)
        if openssh_public(key) != public_line:
            raise KeyMaterialError(
                f"Private key {key_path} does not match the public key authorized for {name!r} in "
                f"{directory / AUTHORIZED_NODES}; the key files were swapped: restore {key_path.name} for this node."
            )
    return NodeKey(
        name=name,
        public_key=public_line,
        private_key_path=key_path if has_key else None,
        public_key_path=pub_path if has_pub else None,
    )
