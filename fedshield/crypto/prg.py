"""SecAgg+ mask expansion: a seed (a 32-byte mask seed or an ECDH shared key) becomes uniform integers mod m.

Why not Flower's ``pseudo_rand_gen``: it folds the seed into 32 bits and seeds numpy's Mersenne Twister, so a
server that sees one masked vector can try all 2**32 seeds (minutes on a GPU) and strip a self mask, and MT19937's
output is not cryptographically unpredictable anyway. Here the WHOLE seed goes through HKDF-SHA256 into a ChaCha20
key, and the keystream becomes integers without modulo bias:

* modulus a power of two up to 2**32 (every fedshield field): each 32-bit keystream word masked to its low bits,
  which is exactly uniform;
* any other modulus up to 2**32: rejection sampling, a word ``w`` is kept only if ``w < 2**32 - 2**32 % m``.

Both ends (clients masking, the server unmasking a dropped node's pairwise masks) call :func:`expand_mask` with the
same seed and shapes and get the same integers; entries are drawn for the concatenation of all shapes in order.
``cryptography`` and numpy only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Final

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from numpy.typing import NDArray

__all__ = ["MASK_PRG", "expand_mask", "mask_chunks"]

#: Names the expansion on the wire: a client announces it at SETUP so that the server never unmasks with another.
MASK_PRG: Final = "hkdf-sha256/chacha20/v1"

_INFO: Final = b"fedshield secagg+ mask " + MASK_PRG.encode()
_NONCE: Final = bytes(16)  # ChaCha20's 16-byte counter||nonce; each HKDF key is used for one stream only
_WORD: Final = 1 << 32


def expand_mask(seed: bytes, modulus: int, shapes: Sequence[tuple[int, ...]]) -> list[NDArray[np.int64]]:
    """Uniform integers in ``[0, modulus)`` for each shape, derived from all of ``seed``.

    Raises ValueError for an empty seed or a modulus outside ``[2, 2**32]``: the caller's field settings are wrong.
    """
    if not isinstance(seed, bytes | bytearray) or len(seed) < 16:
        raise ValueError(f"a mask seed must be at least 16 bytes, got {len(seed) if isinstance(seed, bytes) else seed!r}")
    if isinstance(modulus, bool) or not isinstance(modulus, int) or not 2 <= modulus <= _WORD:
        raise ValueError(f"the mask modulus must be an int in [2, 2**32], got {modulus!r}")
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    flat = _uniform(_keystream(bytes(seed)), modulus, sum(sizes))
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[start:start + size].reshape(shape))
        start += size
    return out


def mask_chunks(seed: bytes, modulus: int, count: int, chunk: int = 1 << 20) -> Iterator[NDArray[np.uint32]]:
    """The ``count`` integers :func:`expand_mask` draws for ``seed`` (shapes concatenated), ``chunk`` at a time.

    Why: the server removes a mask from its running sum in place, and the whole mask as int64 (plus the keystream
    it came from) was four times the model's fp32 size on its own. Only for a power-of-two modulus, where every
    keystream word gives one value, so chunk boundaries cannot change which words are used (rejection sampling
    over-draws per call); raises ValueError for any other modulus.
    """
    if isinstance(modulus, bool) or not isinstance(modulus, int) or not 2 <= modulus <= _WORD or modulus & (modulus - 1):
        raise ValueError(f"chunked mask expansion needs a power-of-two modulus in [2, 2**32], got {modulus!r}")
    if not isinstance(seed, bytes | bytearray) or len(seed) < 16:
        raise ValueError("a mask seed must be at least 16 bytes")
    stream, low = _keystream(bytes(seed)), np.uint32(modulus - 1)
    for start in range(0, count, chunk):
        words = stream.words(min(chunk, count - start)).copy()  # frombuffer is read-only
        yield np.bitwise_and(words, low, out=words)


class _Stream:
    """An endless ChaCha20 keystream read in 32-bit little-endian words."""

    def __init__(self, key: bytes) -> None:
        self._enc = Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor()

    def words(self, count: int) -> NDArray[np.uint32]:
        return np.frombuffer(self._enc.update(bytes(4 * count)), dtype="<u4")


def _keystream(seed: bytes) -> _Stream:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(seed)
    return _Stream(key)


def _uniform(stream: _Stream, modulus: int, count: int) -> NDArray[np.int64]:
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    if modulus & (modulus - 1) == 0:
        return (stream.words(count).astype(np.int64)) & (modulus - 1)
    limit = _WORD - _WORD % modulus  # words at or above it would favour small residues
    parts: list[NDArray[Any]] = []
    need = count
    while need > 0:
        # Draw a little more than needed: at most half of all words are rejected (modulus just above 2**31).
        words = stream.words(need + need // 8 + 16)
        kept = words[words < limit][:need]
        parts.append(kept.astype(np.int64) % modulus)
        need -= kept.size
    return np.concatenate(parts)
