"""TLS certificates and SuperNode keys for a fedshield deployment, made and checked with ``cryptography`` only.

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
import ipaddress
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedshield.atomic import atomic_write_bytes
from fedshield.errors import KeyMaterialError

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "AUTHORIZED_NODES",
    "NodeKey",
    "KeySet",
    "NodeCredentials",
    "init_keys",
    "add_node",
    "load_keyset",
    "load_node_credentials",
    "load_node_key",
]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
AUTHORIZED_NODES = "authorized-nodes.txt"

_CURVE = ec.SECP384R1()
_HASH = hashes.SHA384()
_NIST_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_CA_DAYS = 3650
_SERVER_DAYS = 825
# Hosts the SuperLink's own SuperExec dials: Flower rewrites a bind-all --host (0.0.0.0) to 127.0.0.1 and then
# verifies the Runtime API certificate, so without these SANs a TLS SuperLink cannot start its ServerApp.
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_PRIVATE_MODE = 0o600


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


# ---------------------------------------------------------------------------------------------------- public API


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
        _remove_existing_set(out)
    else:
        _refuse_existing(_set_paths(out, names), hint="pass --force (force=True) to replace the whole set")
    ca_key, ca_cert = _make_ca()
    server_key, server_cert = _make_server_cert(ca_key, ca_cert, hosts)
    node_keys = [(name, ec.generate_private_key(_CURVE)) for name in names]
    # Private keys first: a crash part-way leaves files that load_keyset reports as an incomplete set.
    _write_private(out / CA_KEY, _pkcs8(ca_key))
    _write_private(out / SERVER_KEY, _pkcs8(server_key))
    for name, key in node_keys:
        _write_node_files(out, name, key)
    _write_public(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_public(out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_public(out / AUTHORIZED_NODES, _authorized_text((n, _openssh_public(k)) for n, k in node_keys))
    return load_keyset(out)


def add_node(keys_dir: Path, *, name: str | None = None) -> Path:
    """Authorize one more SuperNode in ``keys_dir``; returns the new private key file to hand to that site.

    Without ``name`` the next free ``node-N`` is used. The SuperLink learns of the node only when its public key
    is registered (``flwr supernode register``), which :mod:`fedshield.deploy` does from ``authorized-nodes.txt``.
    Production sites make their own key instead: :func:`fedshield.crypto.site_keys.add_site_public_key`.
    """
    keyset = load_keyset(keys_dir)
    existing = [n.name for n in keyset.nodes]
    name = _next_node_name(existing) if name is None else _check_node_name(name)
    if name in existing:
        raise KeyMaterialError(
            f"A node named {name!r} is already in {keyset.authorized_nodes}; choose another --name."
        )
    key_path, pub_path = _node_paths(keyset.directory, name)
    _refuse_existing([key_path, pub_path], hint="choose another --name, or delete the stray file")
    key = ec.generate_private_key(_CURVE)
    _write_node_files(keyset.directory, name, key)
    entries = [(n.name, n.public_key) for n in keyset.nodes] + [(name, _openssh_public(key))]
    _write_public(keyset.authorized_nodes, _authorized_text(entries))
    return key_path


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
    authorized = _read_authorized(directory / AUTHORIZED_NODES)
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
    return NodeCredentials(ca_cert=Path(ca_cert), private_key=Path(private_key), public_key=_openssh_public(key))


# ---------------------------------------------------------------------------------------------------- generation


def _make_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Self-signed CA, path length 0: it may sign the server certificate but no intermediate CA."""
    key = ec.generate_private_key(_CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedshield CA")])
    now = _now()
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
    return key, builder.sign(key, _HASH)


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Leaf certificate for TLS servers; every host becomes a SAN (clients ignore the CN)."""
    key = ec.generate_private_key(_CURVE)
    now = _now()
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
    return key, builder.sign(ca_key, _HASH)


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


def _openssh_public(key: ec.EllipticCurvePrivateKey) -> str:
    public = key.public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


# ---------------------------------------------------------------------------------------------------- files


def _node_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.key", directory / f"{name}.pub"


def _set_paths(out: Path, names: Iterable[str]) -> list[Path]:
    paths = [out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY, out / AUTHORIZED_NODES]
    for name in names:
        paths.extend(_node_paths(out, name))
    return paths


def _refuse_existing(paths: Iterable[Path], *, hint: str) -> None:
    for path in paths:
        if path.exists() or path.is_symlink():
            raise KeyMaterialError(f"Refusing to overwrite existing key material {path}; {hint}.")


def _remove_existing_set(out: Path) -> None:
    """With force: drop the old set, including nodes added later, so no stale key looks authorized."""
    names: list[str] = []
    authorized = out / AUTHORIZED_NODES
    if authorized.is_file():
        try:
            names = [name for name, _ in _read_authorized(authorized)]
        except KeyMaterialError:
            names = []
    names += [p.stem for p in out.glob("node-*.key")] + [p.stem for p in out.glob("node-*.pub")]
    for path in _set_paths(out, dict.fromkeys(names)):
        path.unlink(missing_ok=True)


def _write_node_files(directory: Path, name: str, key: ec.EllipticCurvePrivateKey) -> None:
    key_path, pub_path = _node_paths(directory, name)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    _write_private(key_path, private)
    _write_public(pub_path, f"{_openssh_public(key)} {name}\n".encode())


def _write_private(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=_PRIVATE_MODE)


def _write_public(path: Path, data: bytes | str) -> None:
    atomic_write_bytes(path, data.encode() if isinstance(data, str) else data, mode=0o644)


def _authorized_text(entries: Iterable[tuple[str, str]]) -> str:
    header = "# fedshield authorized SuperNodes: <ecdsa public key> <name>, one per line\n"
    return header + "".join(f"{key} {name}\n" for name, key in entries)


def _next_node_name(existing: Sequence[str]) -> str:
    numbers = [int(m.group(1)) for n in existing if (m := re.fullmatch(r"node-(\d+)", n))]
    return f"node-{max(numbers, default=0) + 1}"


def _check_node_name(name: str) -> str:
    if not isinstance(name, str) or not _NODE_NAME.match(name):
        raise KeyMaterialError(
            f"Node name {name!r} is not usable as a file name; use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (e.g. hospital-a)."
        )
    return name


# ---------------------------------------------------------------------------------------------------- loading


def _read_bytes(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise KeyMaterialError(
            f"Missing {what} {path}; copy it from the directory made by `fedshield keys init`, or re-run it."
        )
    try:
        return path.read_bytes()
    except OSError as err:
        raise KeyMaterialError(f"Cannot read {what} {path} ({err.strerror}); check its owner and mode.") from err


def _load_cert(path: Path) -> x509.Certificate:
    data = _read_bytes(path, "certificate")
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
    data = _read_bytes(path, "private key")
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
    data = _read_bytes(path, "node private key")
    _check_private_mode(path)
    try:
        key = serialization.load_ssh_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyMaterialError(
            f"{path} is not an unencrypted OpenSSH private key ({err}); use the .key file from `fedshield keys`."
        ) from err
    _check_nist_ec(key, path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):  # unreachable after the check; narrows the type
        raise KeyMaterialError(f"{path} is not an EC private key; use the .key file from `fedshield keys`.")
    return key


def _check_nist_ec(key: object, path: Path) -> None:
    """Flower 1.39 node authentication takes only EC keys on NIST curves; Ed25519 and RSA are refused."""
    is_ec = isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey))
    if not is_ec or not isinstance(getattr(key, "curve", None), _NIST_CURVES):
        raise KeyMaterialError(
            f"{path}: got {type(key).__name__}, but Flower node authentication needs ECDSA on a NIST curve; "
            "make one with `fedshield keys add-node` (or `ssh-keygen -t ecdsa -b 384`)."
        )


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
    now = _now()
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


def _read_authorized(path: Path) -> list[tuple[str, str]]:
    """Parse ``<type> <base64> <name>`` lines; returns (name, "<type> <base64>") pairs, names unique."""
    text = _read_bytes(path, "authorized nodes list").decode("utf-8", errors="replace")
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
        _check_node_name(name)
        if name in (n for n, _ in entries):
            raise KeyMaterialError(f"{path}:{number}: node name {name!r} appears twice; keep one line per node.")
        entries.append((name, _check_public_line(f"{key_type} {blob}", f"{path}:{number}")))
    return entries


def _check_public_line(line: str, where: str) -> str:
    try:
        public = serialization.load_ssh_public_key(line.encode())
    except (ValueError, UnsupportedAlgorithm) as err:
        raise KeyMaterialError(
            f"{where}: not an OpenSSH public key ({err}); regenerate it with `fedshield keys add-node`."
        ) from err
    _check_nist_ec(public, Path(where))
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def _load_node(directory: Path, name: str, public_line: str) -> NodeKey:
    """A node entry; its .key/.pub files are optional (a SuperLink host should hold only the list)."""
    key_path, pub_path = _node_paths(directory, name)
    has_key, has_pub = key_path.exists(), pub_path.exists()
    if has_pub:
        pub_text = _read_bytes(pub_path, "node public key").decode("utf-8", errors="replace").split()
        on_disk = _check_public_line(" ".join(pub_text[:2]), str(pub_path))
        if on_disk != public_line:
            raise KeyMaterialError(
                f"{pub_path} does not match the entry for {name!r} in {directory / AUTHORIZED_NODES}; "
                "one of them was replaced: regenerate the node with `fedshield keys add-node`."
            )
    if has_key:
        key = _load_node_private(key_path)
        if _openssh_public(key) != public_line:
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
