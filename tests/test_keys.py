"""Key material: what init_keys writes, that real TLS stacks accept it, and every error load_keyset must raise."""

from __future__ import annotations

import ipaddress
import shutil
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from typer.testing import CliRunner

from fedshield.cli.keys import keys_app
from fedshield.crypto import KeySet, add_node, init_keys, load_keyset, load_node_credentials
from fedshield.errors import KeyMaterialError

HOSTS = ["127.0.0.1", "superlink.example.org"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    """One read-only key set for the tests that only look (EC keygen is fast, but files add up)."""
    return init_keys(tmp_path_factory.mktemp("keys") / "k", server_hosts=HOSTS, nodes=2)


@pytest.fixture
def keys(tmp_path: Path) -> KeySet:
    """A fresh key set a test may damage."""
    return init_keys(tmp_path / "keys", server_hosts=HOSTS, nodes=2)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ------------------------------------------------------------------------------------------------ what is written


def test_init_writes_every_file_with_private_keys_0600(shared: KeySet) -> None:
    d = shared.directory
    expected = {"ca.pem", "ca.key", "server.pem", "server.key", "authorized-nodes.txt"}
    expected |= {f"node-{i}.{ext}" for i in (1, 2) for ext in ("key", "pub")}
    assert {p.name for p in d.iterdir()} == expected  # no temp files left behind
    for name in ("ca.key", "server.key", "node-1.key", "node-2.key"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600, name
    for name in ("ca.pem", "server.pem", "node-1.pub", "authorized-nodes.txt"):
        assert stat.S_IMODE((d / name).stat().st_mode) & 0o077 == 0o044, name


def test_server_cert_is_signed_by_the_ca_and_names_every_host(shared: KeySet) -> None:
    ca, server = _cert(shared.ca_cert), _cert(shared.server_cert)
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    ips = san.get_values_for_type(x509.IPAddress)
    dns = san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in ips  # an IP SAN: TLS never matches an address against a DNS SAN
    assert "127.0.0.1" not in dns
    assert "superlink.example.org" in dns and "localhost" in dns


def test_node_keys_are_openssh_ecdsa_p384_and_listed(shared: KeySet) -> None:
    lines = [ln for ln in shared.authorized_nodes.read_text().splitlines() if not ln.startswith("#")]
    assert [ln.split()[2] for ln in lines] == ["node-1", "node-2"]
    for node in shared.nodes:
        assert node.public_key.startswith("ecdsa-sha2-nistp384 ")
        assert node.private_key_path is not None and node.public_key_path is not None
        public = serialization.load_ssh_public_key(node.public_key_path.read_bytes())
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
        data = node.private_key_path.read_bytes()
        assert data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = serialization.load_ssh_private_key(data, password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()
    assert shared.nodes[0].public_key != shared.nodes[1].public_key


@pytest.mark.parametrize("server_name", ["127.0.0.1", "localhost", "superlink.example.org"])
def test_a_real_tls_handshake_accepts_the_server_for_each_host(shared: KeySet, server_name: str) -> None:
    assert _handshake(shared, shared.ca_cert, server_name) == "ok"


def test_a_real_tls_handshake_rejects_another_ca(shared: KeySet, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other", server_hosts=["127.0.0.1"], nodes=0)
    assert "CERTIFICATE_VERIFY_FAILED" in _handshake(shared, other.ca_cert, "127.0.0.1")


def _handshake(keys: KeySet, ca: Path, server_name: str) -> str:
    """TLS 1.3 handshake on 127.0.0.1 with hostname checking for ``server_name``; returns "ok" or the error."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(keys.server_cert, keys.server_key)
    client_ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_name):
                    return "ok"
        except ssl.SSLError as err:
            return str(err)
        finally:
            thread.join(timeout=5)


# ------------------------------------------------------------------------------------------------ load_keyset errors


def test_load_keyset_round_trips(shared: KeySet) -> None:
    again = load_keyset(shared.directory)
    assert again == shared
    assert set(HOSTS) <= set(again.server_hosts)


@pytest.mark.parametrize("name", ["ca.pem", "server.pem", "server.key", "authorized-nodes.txt"])
def test_load_keyset_names_a_missing_file(keys: KeySet, name: str) -> None:
    (keys.directory / name).unlink()
    with pytest.raises(KeyMaterialError, match=rf"Missing .*{name}.*fedshield keys init"):
        load_keyset(keys.directory)


def test_load_keyset_rejects_a_server_cert_from_another_ca(keys: KeySet, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other", server_hosts=["127.0.0.1"], nodes=0)
    shutil.copy(other.server_cert, keys.server_cert)
    with pytest.raises(KeyMaterialError, match=r"server\.pem is not signed by .*ca\.pem"):
        load_keyset(keys.directory)


def test_load_keyset_rejects_a_server_key_that_does_not_match(keys: KeySet, tmp_path: Path) -> None:
    other = init_keys(tmp_path / "other", server_hosts=["127.0.0.1"], nodes=0)
    shutil.copy(other.server_key, keys.server_key)
    with pytest.raises(KeyMaterialError, match=r"server\.key does not match .*server\.pem"):
        load_keyset(keys.directory)


def test_load_keyset_rejects_swapped_node_keys(keys: KeySet) -> None:
    one, two = keys.directory / "node-1.key", keys.directory / "node-2.key"
    data = one.read_bytes()
    one.write_bytes(two.read_bytes())
    two.write_bytes(data)
    with pytest.raises(KeyMaterialError, match=r"node-1\.key does not match .*'node-1'.*swapped"):
        load_keyset(keys.directory)


def test_load_keyset_rejects_a_private_key_readable_by_others(keys: KeySet) -> None:
    keys.server_key.chmod(0o644)
    with pytest.raises(KeyMaterialError, match=r"server\.key is readable by other users .*chmod 600"):
        load_keyset(keys.directory)


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("ecdsa-sha2-nistp384 AAAA\n", r"authorized-nodes\.txt:4: expected '<key type> <base64 key> <name>'"),
        ("ecdsa-sha2-nistp384 AAAAnotbase64 site-x\n", r"authorized-nodes\.txt:4: not an OpenSSH public key"),
        ("ED25519 site-x\n", r"authorized-nodes\.txt:4: got .*Ed25519.*ECDSA on a NIST curve"),
    ],
)
def test_load_keyset_rejects_a_malformed_authorized_list(keys: KeySet, line: str, match: str) -> None:
    if line.startswith("ED25519"):  # Flower refuses Ed25519 node keys, so must we
        public = ed25519.Ed25519PrivateKey.generate().public_key()
        openssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        line = line.replace("ED25519", openssh.decode())
    with keys.authorized_nodes.open("a") as fh:
        fh.write(line)
    with pytest.raises(KeyMaterialError, match=match):
        load_keyset(keys.directory)


def test_load_keyset_works_on_a_server_without_node_private_keys(keys: KeySet) -> None:
    for node in keys.nodes:
        assert node.private_key_path is not None
        node.private_key_path.unlink()
    loaded = load_keyset(keys.directory)
    assert [n.private_key_path for n in loaded.nodes] == [None, None]
    assert [n.public_key for n in loaded.nodes] == [n.public_key for n in keys.nodes]


# ------------------------------------------------------------------------------------------------ overwrite, add-node


def test_init_refuses_to_overwrite_and_leaves_the_old_set(keys: KeySet) -> None:
    before = keys.ca_cert.read_bytes()
    with pytest.raises(KeyMaterialError, match=r"Refusing to overwrite existing key material .*ca\.pem.*--force"):
        init_keys(keys.directory, server_hosts=["127.0.0.1"], nodes=1)
    assert keys.ca_cert.read_bytes() == before
    assert load_keyset(keys.directory) == keys


def test_init_force_replaces_the_whole_set(keys: KeySet) -> None:
    old_ca = keys.ca_cert.read_bytes()
    add_node(keys.directory, name="hospital-a")
    fresh = init_keys(keys.directory, server_hosts=["127.0.0.1"], nodes=1, force=True)
    assert fresh.ca_cert.read_bytes() != old_ca
    assert [n.name for n in fresh.nodes] == ["node-1"]
    assert not (keys.directory / "hospital-a.key").exists()  # a stale key must not look authorized
    assert not (keys.directory / "node-2.key").exists()


def test_add_node_picks_the_next_name_and_appends(keys: KeySet) -> None:
    path = add_node(keys.directory)
    assert path.name == "node-3.key" and stat.S_IMODE(path.stat().st_mode) == 0o600
    named = add_node(keys.directory, name="hospital-a")
    loaded = load_keyset(keys.directory)
    assert [n.name for n in loaded.nodes] == ["node-1", "node-2", "node-3", "hospital-a"]
    assert loaded.node("hospital-a").private_key_path == named
    assert add_node(keys.directory).name == "node-4.key"


@pytest.mark.parametrize(("name", "match"), [("node-1", "already in"), ("../evil", "not usable as a file name")])
def test_add_node_refuses_bad_names(keys: KeySet, name: str, match: str) -> None:
    with pytest.raises(KeyMaterialError, match=match):
        add_node(keys.directory, name=name)


@pytest.mark.parametrize("host", ["http://superlink", "host:9092", "bad_host!", ""])
def test_init_rejects_hosts_that_are_not_names_or_addresses(tmp_path: Path, host: str) -> None:
    with pytest.raises(KeyMaterialError, match="neither an IP address nor a DNS name"):
        init_keys(tmp_path / "k", server_hosts=[host], nodes=1)
    assert not (tmp_path / "k").exists()


def test_load_node_credentials_accepts_a_node_key_and_refuses_ed25519(shared: KeySet, tmp_path: Path) -> None:
    node = shared.nodes[0]
    assert node.private_key_path is not None
    creds = load_node_credentials(ca_cert=shared.ca_cert, private_key=node.private_key_path)
    assert creds.public_key == node.public_key
    ed = tmp_path / "ed.key"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
    )
    ed.chmod(0o600)
    with pytest.raises(KeyMaterialError, match="ECDSA on a NIST curve"):
        load_node_credentials(ca_cert=shared.ca_cert, private_key=ed)
    with pytest.raises(KeyMaterialError, match="not a CA certificate"):
        load_node_credentials(ca_cert=shared.server_cert, private_key=node.private_key_path)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_init_and_add_node(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "keys"
    result = runner.invoke(keys_app, ["init", "--out", str(out), "--server-host", "127.0.0.1,sl.lan", "--nodes", "1"])
    assert result.exit_code == 0, result.output
    assert "node-1.key" in result.stdout
    result = runner.invoke(keys_app, ["add-node", "--keys", str(out), "--name", "site-b"])
    assert result.exit_code == 0, result.output
    assert (out / "site-b.key").is_file()


def test_cli_turns_errors_into_one_line_and_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["init", "--out", str(tmp_path / "k"), "--server-host", "127.0.0.1", "--nodes", "1"]
    assert runner.invoke(keys_app, args).exit_code == 0
    result = runner.invoke(keys_app, args)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: Refusing to overwrite")
    assert "Traceback" not in result.output
