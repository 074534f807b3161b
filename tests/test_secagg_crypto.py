"""fedshield.crypto.prg (SecAgg+ mask expansion) and fedshield.crypto.secagg_auth (signed round keys, roster)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedshield.crypto import init_keys, load_node_key, make_site_key
from fedshield.crypto.prg import MASK_PRG, expand_mask
from fedshield.crypto.secagg_auth import (
    KeyAuthenticationError,
    SignedKeys,
    check_participants,
    fingerprint,
    load_roster,
    sign_round_keys,
    signed_payload,
)
from fedshield.errors import KeyMaterialError

SEED = bytes(range(32))

# --- prg -----------------------------------------------------------------------------------------------------


def _reference_words(seed: bytes, count: int) -> np.ndarray:
    """The expansion spelled out independently: HKDF-SHA256 -> ChaCha20 (zero nonce) -> little-endian u32 words."""
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"fedshield secagg+ mask " + MASK_PRG.encode()).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(4 * count))
    return np.array([int.from_bytes(stream[4 * i:4 * i + 4], "little") for i in range(count)], dtype=np.int64)


def test_known_answer_power_of_two_field_is_the_keystream_masked() -> None:
    words = _reference_words(SEED, 4 * 3 + 1 + 5)
    got = expand_mask(SEED, 2**32, [(4, 3), (), (0,), (5,)])
    assert [a.shape for a in got] == [(4, 3), (), (0,), (5,)]
    assert all(a.dtype == np.int64 for a in got)
    np.testing.assert_array_equal(np.concatenate([a.ravel() for a in got]), words)
    small = expand_mask(SEED, 2**10, [(18,)])[0]
    np.testing.assert_array_equal(small, words & 1023)
    # A pinned value, so that a change of the expansion (which would break mixed client/server versions) is seen.
    assert hashlib.sha256(got[0].tobytes()).hexdigest()[:16] == hashlib.sha256(words[:12].tobytes()).hexdigest()[:16]


def test_other_moduli_are_rejection_sampled_without_bias() -> None:
    m = 3 * 2**30  # 2**32 % m = 2**30: a quarter of the words must be rejected
    words = _reference_words(SEED, 64)
    expected = [int(w) % m for w in words if w < 2**32 - 2**32 % m][:20]
    np.testing.assert_array_equal(expand_mask(SEED, m, [(20,)])[0], expected)
    big = expand_mask(SEED, 3 * 2**30, [(200_000,)])[0]
    assert big.min() >= 0 and big.max() < m
    # Without rejection the lowest third of the range would get 2/4 of the mass instead of 1/3.
    assert abs(float(np.mean(big < 2**30)) - 1 / 3) < 0.01


def test_the_whole_seed_matters_not_32_bits_of_it() -> None:
    """Flower folds the seed into 32 bits by XOR: seeds that differ by the same 4 bytes in two places collide."""
    a = bytearray(SEED)
    b = bytearray(SEED)
    b[0] ^= 0xFF
    b[4] ^= 0xFF  # same XOR fold as a
    from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

    np.testing.assert_array_equal(pseudo_rand_gen(bytes(a), 2**32, [(8,)])[0], pseudo_rand_gen(bytes(b), 2**32, [(8,)])[0])
    assert not np.array_equal(expand_mask(bytes(a), 2**32, [(8,)])[0], expand_mask(bytes(b), 2**32, [(8,)])[0])


def test_masks_are_uniform_and_deterministic() -> None:
    first = expand_mask(SEED, 2**16, [(100_000,)])[0]
    np.testing.assert_array_equal(first, expand_mask(SEED, 2**16, [(100_000,)])[0])
    counts = np.bincount(first >> 12, minlength=16)  # 16 buckets of 6,250 expected
    chi2 = float(np.sum((counts - 6250.0) ** 2 / 6250.0))
    assert chi2 < 50, chi2  # 15 dof: p < 1e-5 above 45


@pytest.mark.parametrize(("seed", "modulus"), [(b"short", 2**32), (SEED, 1), (SEED, 2**32 + 1), (SEED, True)])
def test_bad_arguments_are_refused(seed: bytes, modulus: int) -> None:
    with pytest.raises(ValueError):
        expand_mask(seed, modulus, [(3,)])


# --- signing and the roster ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[ec.EllipticCurvePrivateKey]]:
    """Three sites that made their own keys, and the roster the coordinator assembled from their .pub files."""
    root = tmp_path_factory.mktemp("sites")
    pubs = [make_site_key(root, name=f"site-{i}")[0] for i in range(3)]
    roster = root / "roster.txt"
    roster.write_text("# roster\n" + "".join(p.read_text() for p in pubs))
    return roster, [load_node_key(root / f"site-{i}.key") for i in range(3)]


def _signed(key: ec.EllipticCurvePrivateKey, nid: int, *, run_id: int = 7, round_tag: str = "3") -> SignedKeys:
    pk1, pk2 = f"pk1-{nid}".encode(), f"pk2-{nid}".encode()
    sig, signer = sign_round_keys(key, signed_payload(run_id=run_id, round_tag=round_tag, node_id=nid, stage="setup",
                                                      pk1=pk1, pk2=pk2))
    return SignedKeys(pk1, pk2, sig, signer)


def _check(roster_path: Path, keys: dict[int, SignedKeys], **kw: object) -> dict[int, str]:
    return check_participants(load_roster(roster_path), keys, own_node_id=10, run_id=7, round_tag="3",
                              stage="setup", **kw)  # type: ignore[arg-type]


def test_honest_participants_verify(sites: tuple[Path, list[ec.EllipticCurvePrivateKey]]) -> None:
    roster, keys = sites
    names = _check(roster, {10: _signed(keys[0], 10), 20: _signed(keys[1], 20), 30: _signed(keys[2], 30)})
    assert names == {10: "site-0", 20: "site-1", 30: "site-2"}


def test_tampering_is_detected(sites: tuple[Path, list[ec.EllipticCurvePrivateKey]]) -> None:
    roster, keys = sites
    good = {10: _signed(keys[0], 10), 20: _signed(keys[1], 20), 30: _signed(keys[2], 30)}
    server_key = ec.generate_private_key(ec.SECP384R1())
    swapped = SignedKeys(b"server-pk1", good[20].pk2, good[20].signature, good[20].signer)
    cases = {
        "substituted key": ({**good, 20: swapped}, "do not verify"),
        "signer not in roster": ({**good, 20: _signed(server_key, 20)}, "not in the roster"),
        "other round": ({**good, 20: _signed(keys[1], 20, round_tag="2")}, "another run, round or node id"),
        "other run": ({**good, 20: _signed(keys[1], 20, run_id=8)}, "another run, round or node id"),
        "other node id": ({10: good[10], 30: good[30], 21: good[20]}, "another run, round or node id"),
        "one key, two ids": ({**good, 40: _signed(keys[1], 40)}, "signs for two node ids"),
        "too few peers": ({10: good[10], 20: good[20]}, "fewer than this site's minimum of 2"),
    }
    for name, (entries, match) in cases.items():
        with pytest.raises(KeyAuthenticationError, match=match):
            _check(roster, entries)
        assert name
    assert _check(roster, {10: good[10], 20: good[20]}, min_peers=1) == {10: "site-0", 20: "site-1"}


def test_fingerprint_is_what_ssh_keygen_prints(sites: tuple[Path, list[ec.EllipticCurvePrivateKey]]) -> None:
    roster, keys = sites
    pub = roster.parent / "site-0.pub"
    try:
        out = subprocess.run(["ssh-keygen", "-l", "-f", str(pub)], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("ssh-keygen is not installed")
    assert out.stdout.split()[1] == fingerprint(keys[0].public_key())


def test_authorized_nodes_is_a_roster_and_bad_rosters_fail_with_the_line(tmp_path: Path) -> None:
    keyset = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=2)
    roster = load_roster(keyset.authorized_nodes)
    assert sorted(e.name for e in roster.entries.values()) == ["node-1", "node-2"]
    line = keyset.authorized_nodes.read_text().splitlines()[1]
    cases = {
        "": "lists no node keys",
        "ssh-rsa AAAA x\n": "not an OpenSSH public key",
        f"{line}\n{line}\n": "listed twice",
        "onlyonefield\n": r"r.txt:1: expected '<key type> <base64 key> \[name\]'",
    }
    for text, match in cases.items():
        (tmp_path / "r.txt").write_text(text)
        with pytest.raises(KeyMaterialError, match=match):
            load_roster(tmp_path / "r.txt")
    with pytest.raises(KeyMaterialError, match="cannot read the SecAgg"):
        load_roster(tmp_path / "absent.txt")


def test_site_key_refuses_to_overwrite_and_is_private(tmp_path: Path) -> None:
    pub, printed = make_site_key(tmp_path, name="hospital-a")
    assert (tmp_path / "hospital-a.key").stat().st_mode & 0o077 == 0
    assert printed == fingerprint(load_node_key(tmp_path / "hospital-a.key").public_key())
    with pytest.raises(KeyMaterialError, match="Refusing to overwrite"):
        make_site_key(tmp_path, name="hospital-a")
    assert pub.read_text().endswith(" hospital-a\n")


def test_cli_site_key_then_coordinator_authorizes_the_pub_only(tmp_path: Path) -> None:
    """The production flow: the site makes its key, the coordinator gets the .pub alone, fingerprints match."""
    from typer.testing import CliRunner

    from fedshield.cli.keys import keys_app
    from fedshield.crypto import load_keyset

    runner = CliRunner()
    assert runner.invoke(keys_app, ["init", "--out", str(tmp_path / "coord"), "--server-host", "127.0.0.1",
                                    "--nodes", "0"]).exit_code == 0
    made = runner.invoke(keys_app, ["site-key", "--out", str(tmp_path / "site"), "--name", "hospital-a"])
    assert made.exit_code == 0, made.output
    printed = next(line.split()[1] for line in made.stdout.splitlines() if line.startswith("Fingerprint:"))
    pub = tmp_path / "site" / "hospital-a.pub"
    added = runner.invoke(keys_app, ["add-node", "--keys", str(tmp_path / "coord"), "--name", "hospital-a",
                                     "--public-key", str(pub)])
    assert added.exit_code == 0, added.output
    keyset = load_keyset(tmp_path / "coord")
    assert [n.name for n in keyset.nodes] == ["hospital-a"] and keyset.nodes[0].private_key_path is None
    listed = runner.invoke(keys_app, ["fingerprints", "--roster", str(keyset.authorized_nodes)])
    assert listed.stdout.split() == [printed, "hospital-a"]
    again = runner.invoke(keys_app, ["add-node", "--keys", str(tmp_path / "coord"), "--name", "other",
                                     "--public-key", str(pub)])
    assert again.exit_code == 2 and "already in" in again.stderr
