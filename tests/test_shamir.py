"""fedshield's Shamir secret sharing is Flower's (PyCryptodome's) field, format and polynomial, only faster: shares
made by either side combine on the other, and Flower's client SecAgg+ uses ours."""

from __future__ import annotations

import inspect
import os
import random

import pytest
from Crypto.Protocol.SecretSharing import _Element
from flwr.common.secure_aggregation.crypto import shamir as flower

from fedshield.crypto import shamir


def test_field_arithmetic_is_pycryptodomes() -> None:
    rng = random.Random(0)
    for bits in (1, 3, 7, 64, 127, 128):
        for _ in range(30):
            a, b = rng.getrandbits(128), rng.getrandbits(bits)
            assert shamir.gf_mul(a, b) == int(_Element(a) * _Element(b)) == shamir.gf_mul(b, a)
    for _ in range(10):
        a = rng.getrandbits(128) or 1
        assert shamir.gf_inv(a) == int(_Element(a).inverse())
        assert shamir.gf_mul(a, shamir.gf_inv(a)) == 1
    with pytest.raises(ValueError, match="zero"):
        shamir.gf_inv(0)


@pytest.mark.parametrize("length", [0, 1, 15, 16, 32, 45])
@pytest.mark.parametrize(("threshold", "num"), [(2, 2), (2, 3), (5, 7), (66, 100)])
def test_shares_combine_across_implementations(length: int, threshold: int, num: int) -> None:
    rng = random.Random(length * 1000 + num)
    secret = os.urandom(length)
    ours, theirs = shamir.create_shares(secret, threshold, num), flower.create_shares(secret, threshold, num)
    assert [len(s) for s in ours] == [len(s) for s in theirs]
    assert [s[:4] for s in ours] == [s[:4] for s in theirs]  # the same 1-based little-endian indices
    for _ in range(3):
        pick = rng.sample(range(num), threshold)
        assert flower.combine_shares([ours[i] for i in pick]) == secret
        assert shamir.combine_shares([theirs[i] for i in pick]) == secret
        assert shamir.combine_shares([ours[i] for i in pick]) == secret


def test_fewer_than_threshold_shares_do_not_give_the_secret() -> None:
    secret = os.urandom(32)
    shares = shamir.create_shares(secret, 4, 6)
    for pick in ([0, 1, 2], [1, 3, 5]):
        try:
            assert shamir.combine_shares([shares[i] for i in pick]) != secret
        except ValueError:  # the wrong polynomial usually fails the padding check
            pass


def test_each_split_draws_fresh_coefficients() -> None:
    secret = os.urandom(32)
    a, b = shamir.create_shares(secret, 3, 5), shamir.create_shares(secret, 3, 5)
    assert all(x[4:] != y[4:] for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("shares", "match"), [
    ([], "no shares"),
    ([b"\x01\x00\x00\x00" + bytes(15)], "malformed"),
    ([b"\x01\x00\x00\x00" + bytes(16), b"\x02\x00\x00\x00" + bytes(32)], "malformed"),
    ([b"\x01\x00\x00\x00" + bytes(16)] * 2, "duplicate"),
    ([b"\x00\x00\x00\x00" + bytes(16)], "zero share index"),
])
def test_malformed_shares_are_refused(shares: list[bytes], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shamir.combine_shares(shares)


@pytest.mark.parametrize(("threshold", "num"), [(0, 3), (4, 3)])
def test_impossible_splits_are_refused(threshold: int, num: int) -> None:
    with pytest.raises(ValueError, match="threshold"):
        shamir.create_shares(b"secret", threshold, num)


def test_fedshields_client_secagg_uses_ours() -> None:
    """fedshield's port of Flower's client mod splits both secrets with this module (two calls per round), one
    share per participant: the server's share count never sets how many a site makes."""
    from fedshield.client import secaggplus

    assert secaggplus.create_shares is shamir.create_shares
    source = inspect.getsource(secaggplus._share_keys)
    assert "create_shares(state.rd_seed, state.threshold, len(keys))" in source
    assert "create_shares(state.sk1, state.threshold, len(keys))" in source
    assert "state.share_num)" not in source.split("create_shares", 1)[1]
