"""Shamir secret sharing over GF(2^128), share for share what Flower's SecAgg+ uses, without its cost.

Flower 1.39's ``flwr.common.secure_aggregation.crypto.shamir`` splits each 16-byte chunk of a secret with
PyCryptodome's ``Shamir``, whose field multiplication builds two 128-character strings per bit. SecAgg+ shares two
secrets per client with every neighbour, and the server rebuilds one per client: with the complete graph of 100
clients that was ~2 minutes of CPU per round on two cores, more than the training.

Same field (x^128 + x^7 + x^2 + x + 1, bit i = coefficient of x^i), same encoding (16 bytes big-endian), same share
format (``<4-byte little-endian index><16 bytes per chunk>``, PKCS#7-padded secret), same polynomial (secret as the
constant term, ``threshold - 1`` random coefficients from the OS CSPRNG), evaluated by Horner's rule: shares made
here combine with Flower's ``combine_shares`` and the other way round (tested). The speed comes from Python integer
arithmetic instead of strings, from multiplying by the small share index in Horner's rule (a few shift-and-XORs),
and, when rebuilding, from computing the Lagrange coefficients once per set of share indices.

Like PyCryptodome's, this is plain Python: not hardened against timing measurement of the process that computes.
"""

from __future__ import annotations

import secrets
from functools import lru_cache

__all__ = ["create_shares", "combine_shares", "gf_mul", "gf_inv"]

_BITS = 128
_IRR = (1 << 128) | 0b10000111  # x^128 + x^7 + x^2 + x + 1
_CHUNK = 16
_INDEX_BYTES = 4


def gf_mul(a: int, b: int) -> int:
    """Product in GF(2^128); fastest when ``b`` is the smaller operand (few bits to walk)."""
    if b > a:
        a, b = b, a
    z = 0
    while b:
        if b & 1:
            z ^= a
        b >>= 1
        a <<= 1
        a ^= _IRR * (a >> _BITS)  # reduce without a branch on a's top bit
    return z


def gf_inv(a: int) -> int:
    """Inverse in GF(2^128): a^(2^128 - 2)."""
    if a == 0:
        raise ValueError("zero has no inverse")
    result, base, e = 1, a, (1 << _BITS) - 2
    while e:
        if e & 1:
            result = gf_mul(result, base)
        base = gf_mul(base, base)
        e >>= 1
    return result


def _pad(secret: bytes) -> bytes:
    n = _CHUNK - len(secret) % _CHUNK
    return secret + bytes([n]) * n


def _unpad(data: bytes) -> bytes:
    n = data[-1] if data else 0
    if not 1 <= n <= _CHUNK or data[-n:] != bytes([n]) * n:
        raise ValueError("Failed to combine shares")
    return data[:-n]


def create_shares(secret: bytes, threshold: int, num: int) -> list[bytes]:
    """``num`` shares of ``secret``, any ``threshold`` of which rebuild it (Flower's signature and format)."""
    if not 1 <= threshold <= num or num >= 2**32:
        raise ValueError(f"need 1 <= threshold <= num < 2**32, got threshold {threshold}, num {num}")
    padded = _pad(secret)
    chunks = [int.from_bytes(padded[i:i + _CHUNK], "big") for i in range(0, len(padded), _CHUNK)]
    # Highest degree first, the secret last (the constant term): Horner's order.
    polys = [[int.from_bytes(secrets.token_bytes(_CHUNK), "big") for _ in range(threshold - 1)] + [c] for c in chunks]
    shares = []
    for x in range(1, num + 1):
        out = bytearray(x.to_bytes(_INDEX_BYTES, "little"))
        for coeffs in polys:
            y = 0
            for c in coeffs:
                y = gf_mul(y, x) ^ c
            out += y.to_bytes(_CHUNK, "big")
        shares.append(bytes(out))
    return shares


@lru_cache(maxsize=256)
def _lagrange_at_zero(indices: tuple[int, ...]) -> tuple[int, ...]:
    """l_j(0) = prod_{m != j} x_m / (x_j + x_m) for each share index x_j (addition is XOR in GF(2^k))."""
    nums, dens = [], []
    for j, xj in enumerate(indices):
        num, den = 1, 1
        for m, xm in enumerate(indices):
            if m != j:  # small factors: each product is a few shift-and-XORs
                num = gf_mul(num, xm)
                den = gf_mul(den, xj ^ xm)
        nums.append(num)
        dens.append(den)
    inverses = _batch_inverse(dens)
    return tuple(gf_mul(n, d) for n, d in zip(nums, inverses, strict=True))


def _batch_inverse(values: list[int]) -> list[int]:
    """Every inverse for the price of one (Montgomery's trick): prefix products, one inversion, walk back."""
    prefix = [1]
    for v in values:
        prefix.append(gf_mul(prefix[-1], v))
    inv = gf_inv(prefix[-1])
    out = [0] * len(values)
    for i in range(len(values) - 1, -1, -1):
        out[i] = gf_mul(inv, prefix[i])
        inv = gf_mul(inv, values[i])
    return out


def combine_shares(share_list: list[bytes]) -> bytes:
    """The secret from ``threshold`` shares made by :func:`create_shares` or by Flower's ``create_shares``."""
    if not share_list:
        raise ValueError("Failed to combine shares: no shares")
    length = len(share_list[0])
    if length < _INDEX_BYTES + _CHUNK or (length - _INDEX_BYTES) % _CHUNK or any(len(s) != length for s in share_list):
        raise ValueError("Failed to combine shares: malformed share")
    indices = tuple(int.from_bytes(s[:_INDEX_BYTES], "little") for s in share_list)
    if len(set(indices)) != len(indices) or 0 in indices:
        raise ValueError("Failed to combine shares: duplicate or zero share index")
    weights = _lagrange_at_zero(indices)
    out = bytearray()
    for start in range(_INDEX_BYTES, length, _CHUNK):
        value = 0
        for share, w in zip(share_list, weights, strict=True):
            value ^= gf_mul(w, int.from_bytes(share[start:start + _CHUNK], "big"))
        out += value.to_bytes(_CHUNK, "big")
    return _unpad(bytes(out))
