"""Make TLS certificates and SuperNode keys for a fedshield deployment, with ``cryptography`` only.

Loading and checking is :mod:`.key_loading`; the key directory's layout, file names, formats, modes and writers
are :mod:`.key_files`.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedshield.errors import KeyMaterialError

from .key_files import (
    AUTHORIZED_NODES, CA_CERT, CA_KEY, CURVE, HASH, KeySet, SERVER_CERT, SERVER_KEY, authorized_text,
    check_node_name, next_node_name, node_paths, openssh_public, pkcs8, refuse_existing, remove_existing_set, set_paths,
    utc_now, write_node_files, write_private, write_public,
)
from .key_loading import load_keyset

__all__ = ["add_node", "init_keys"]

_CA_DAYS = 3650
_SERVER_DAYS = 825
# Hosts the SuperLink's own SuperExec dials: Flower rewrites a bind-all --host (0.0.0.0) to 127.0.0.1 and then
# verifies the Runtime API certificate, so without these SANs a TLS SuperLink cannot start its ServerApp.
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def init_keys(out: Path, *, server_hosts: Sequence[str], nodes: int, force: bool = False) -> KeySet:
    """Create a CA, a server certificate for ``server_hosts`` and ``nodes`` node key pairs under ``out``.

    ``server_hosts`` are the names or IP addresses SuperNodes dial; loopback names are always added because the
    SuperLink dials itself. With ``force=False`` any existing key file is left alone and the call fails before
    writing anything; ``force=True`` replaces the whole set, so every site then needs its new key and ``ca.pem``.
    """
    out = Path(out)
    hosts = _normalize_hosts(server_hosts)
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 0:
        raise KeyMaterialError(f"nodes must be an integer >= 0, got {nodes!r}; pass e.g. --nodes 2.")
    names = [f"node-{i}" for i in range(1, nodes + 1)]
    if force:
        remove_existing_set(out)
    else:
        refuse_existing(set_paths(out, names), hint="pass --force (force=True) to replace the whole set")
    ca_key, ca_cert = _make_ca()
    server_key, server_cert = _make_server_cert(ca_key, ca_cert, hosts)
    node_keys = [(name, ec.generate_private_key(CURVE)) for name in names]
    # Private keys first: a crash part-way leaves files that load_keyset reports as an incomplete set.
    write_private(out / CA_KEY, pkcs8(ca_key))
    write_private(out / SERVER_KEY, pkcs8(server_key))
    for name, key in node_keys:
        write_node_files(out, name, key)
    write_public(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    write_public(out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    write_public(out / AUTHORIZED_NODES, authorized_text((n, openssh_public(k)) for n, k in node_keys))
    return load_keyset(out)


def add_node(keys_dir: Path, *, name: str | None = None) -> Path:
    """Authorize one more SuperNode in ``keys_dir``; returns the new private key file to hand to that site.

    Without ``name`` the next free ``node-N`` is used. The SuperLink learns of the node only when its public key
    is registered (``flwr supernode register``), which :mod:`fedshield.deploy` does from ``authorized-nodes.txt``.
    Production sites make their own key instead: :func:`fedshield.crypto.site_keys.add_site_public_key`.
    """
    keyset = load_keyset(keys_dir)
    existing = [n.name for n in keyset.nodes]
    name = next_node_name(existing) if name is None else check_node_name(name)
    if name in existing:
        raise KeyMaterialError(
            f"A node named {name!r} is already in {keyset.authorized_nodes}; choose another --name."
        )
    key_path, pub_path = node_paths(keyset.directory, name)
    refuse_existing([key_path, pub_path], hint="choose another --name, or delete the stray file")
    key = ec.generate_private_key(CURVE)
    write_node_files(keyset.directory, name, key)
    entries = [(n.name, n.public_key) for n in keyset.nodes] + [(name, openssh_public(key))]
    write_public(keyset.authorized_nodes, authorized_text(entries))
    return key_path


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Self-signed CA, path length 0: it may sign the server certificate but no intermediate CA."""
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedshield CA")])
    now = utc_now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, builder.sign(key, HASH)


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Leaf certificate for TLS servers; every host becomes a SAN (clients ignore the CN)."""
    key = ec.generate_private_key(CURVE)
    now = utc_now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=_SERVER_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    return key, builder.sign(ca_key, HASH)


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    """An IP literal must be an IP SAN: TLS clients never match an address against a DNS SAN."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _normalize_hosts(server_hosts: Sequence[str] | str) -> list[str]:
    """Validated, de-duplicated hosts in the given order, followed by the loopback names."""
    if isinstance(server_hosts, str):
        server_hosts = [server_hosts]
    hosts: list[str] = []
    for raw in [*server_hosts, *_LOOPBACK_HOSTS]:
        host = _check_host(raw)
        if host not in hosts:
            hosts.append(host)
    return hosts


def _check_host(raw: str) -> str:
    host = raw.strip().strip("[]").lower() if isinstance(raw, str) else ""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if host and len(host) <= 253 and all(_DNS_LABEL.match(label) for label in labels):
        return host.rstrip(".")
    raise KeyMaterialError(
        f"Server host {raw!r} is neither an IP address nor a DNS name; pass the name or address SuperNodes dial, "
        "e.g. --server-host superlink.example.org,10.0.0.5 (no port, no scheme)."
    )
