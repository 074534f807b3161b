"""The random rotation of the distributed Skellam mechanism: a randomized Walsh-Hadamard transform.

Why rotate: a site's integer vector must fit the SecAgg+ field without wrapping. A gradient's mass can sit on a few
coordinates; after ``H D / sqrt(D)`` (``D`` random signs, ``H`` the Walsh-Hadamard matrix) every coordinate of a
vector of norm ``c`` is sub-Gaussian with scale ``c / sqrt(D)`` (Agarwal, Kairouz, Liu, NeurIPS 2021, section 4),
so a field sized for the *typical* coordinate holds all of them with overwhelming probability. The transform is
orthonormal, so L2 norms (and with them the L2 sensitivity) are unchanged.

The signs are public: every site and the server derive them from the same seed (the run and the round), so the
server can undo the rotation on the sum. Secrecy is not needed, only that they are fixed before the data is seen.
numpy and ``hashlib`` only.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
from numpy.typing import NDArray

__all__ = ["RandomizedHadamard", "padded_dim", "round_seed"]


def padded_dim(dim: int) -> int:
    """The smallest power of two ``>= dim`` (the Hadamard transform needs one)."""
    if dim < 1:
        raise ValueError(f"a rotation needs a dimension >= 1, got {dim}")
    return 1 << (dim - 1).bit_length()


def round_seed(run_id: int | str, server_round: int, label: str = "skellam-rotation") -> bytes:
    """The seed every party of a round derives the same rotation from: public, fixed before any data is read."""
    return hashlib.sha256(f"fedshield/{label}/run={run_id}/round={server_round}".encode()).digest()


class RandomizedHadamard:
    """``x -> H diag(s) pad(x) / sqrt(D)`` and its inverse, row-wise on ``(..., dim)`` arrays (float64)."""

    def __init__(self, dim: int, seed: bytes) -> None:
        self.dim = int(dim)
        self.padded = padded_dim(self.dim)
        words = np.frombuffer(_expand(seed, self.padded), dtype=np.uint8)
        self.signs = np.where(words & 1, 1.0, -1.0)

    def forward(self, x: NDArray[np.floating]) -> NDArray[np.float64]:
        if x.shape[-1] != self.dim:
            raise ValueError(f"rotation built for dimension {self.dim}, got a vector of {x.shape[-1]}")
        padded = np.zeros((*x.shape[:-1], self.padded), dtype=np.float64)
        padded[..., : self.dim] = x
        return _fwht(padded * self.signs)

    def inverse(self, y: NDArray[np.floating]) -> NDArray[np.float64]:
        if y.shape[-1] != self.padded:
            raise ValueError(f"rotation output has dimension {self.padded}, got {y.shape[-1]}")
        # H / sqrt(D) is symmetric and orthogonal, so it is its own inverse.
        return (_fwht(np.asarray(y, dtype=np.float64)) * self.signs)[..., : self.dim]


def _fwht(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """Orthonormal fast Walsh-Hadamard transform along the last axis (length a power of two)."""
    lead, n = x.shape[:-1], x.shape[-1]
    out = x.reshape(-1, n).copy()
    rows, h = out.shape[0], 1
    while h < n:
        view = out.reshape(rows, n // (2 * h), 2, h)
        a, b = view[:, :, 0, :].copy(), view[:, :, 1, :]
        view[:, :, 0, :] = a + b
        view[:, :, 1, :] = a - b
        h *= 2
    return (out / math.sqrt(n)).reshape(*lead, n)


def _expand(seed: bytes, count: int) -> bytes:
    out, block = bytearray(), 0
    while len(out) < count:
        out += hashlib.sha256(seed + block.to_bytes(8, "little")).digest()
        block += 1
    return bytes(out[:count])
