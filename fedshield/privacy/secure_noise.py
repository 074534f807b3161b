"""Gaussian noise from a CSPRNG, with the floating-point mitigation of Opacus' ``secure_mode``.

Why not torch's generator: a seeded PRNG is predictable to whoever knows (or recovers) its state, and whoever can
predict the noise can subtract it. Opacus' own answer, ``secure_mode=True``, needs ``torchcsprng``, which has had
no release since 2021. This module is the equivalent built on ``cryptography``:

* **Source.** A ChaCha20 keystream under a 256-bit key from ``os.urandom`` (a fresh random 96-bit nonce for each
  chunk, so no (key, nonce) pair is reused and the 32-bit block counter never wraps).
* **Gaussians.** The Box-Muller transform of two 53-bit uniforms: ``u1`` in (0, 1) (never 0, so the log is
  finite) and ``u2`` in [0, 1); ``sqrt(-2 ln u1) cos(2 pi u2)`` and ``... sin(...)`` are independent N(0, 1). The
  53-bit uniforms cut the tails at about 8.6 sigma, a probability below 1e-17 per draw. The cosine and sine are
  torch's float64 kernels (within 1 ulp, as libm's), the rest NumPy's.
* **Floating-point mitigation.** Each output is the sum of four independent normals divided by 2, exactly as
  Opacus' ``_generate_noise`` does in secure mode (Holohan and Braghin, "Secure Random Sampling in Differential
  Privacy", 2021, section 5.1 with n = 2): the attack on the low-order bits of one floating-point Gaussian sample
  (Mironov 2012; Jin et al. 2021) then needs to invert a sum of 2n - 1 unknown draws. Opacus also discards its
  generator's first draw; that guards a freshly seeded torch generator and has no purpose on a keystream.

:func:`use_secure_noise` makes an Opacus DP optimizer draw its noise here. Simulations keep torch's seeded
generator on purpose (reproducible from ``--seed``), and say so: their epsilon is nominal.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from numpy.typing import NDArray

__all__ = ["SecureGaussian", "use_secure_noise", "MITIGATION_DRAWS"]

#: Normals summed per output (then divided by sqrt of this, i.e. 2): Opacus secure_mode's 2n with n = 2.
MITIGATION_DRAWS = 4
_CHUNK = 1 << 20  # normals per keystream chunk: bounds temporary memory for large models


class SecureGaussian:
    """Standard normals (``standard_normal``) and Opacus-shaped noise tensors (``noise``) from ChaCha20."""

    def __init__(self) -> None:
        self._key = os.urandom(32)

    def standard_normal(self, size: int | tuple[int, ...] = ()) -> NDArray[np.float64]:
        """N(0, 1) draws of shape ``size``, each the mitigated sum (see the module docstring)."""
        shape = (size,) if isinstance(size, int) else tuple(size)
        n = math.prod(shape)
        parts = [self._mitigated(min(_CHUNK, n - start)) for start in range(0, n, _CHUNK)]
        flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)
        return flat.reshape(shape)

    def noise(self, std: float, reference: torch.Tensor) -> torch.Tensor:
        """N(0, std^2) noise shaped, typed and placed like ``reference`` (Opacus' ``_generate_noise`` contract)."""
        if std == 0:
            return torch.zeros_like(reference)
        draws = torch.from_numpy(self.standard_normal(tuple(reference.shape)) * std)
        return draws.to(device=reference.device, dtype=reference.dtype)

    def _mitigated(self, n: int) -> NDArray[np.float64]:
        raw = self._normals(MITIGATION_DRAWS * n).reshape(MITIGATION_DRAWS, n)
        return raw.sum(axis=0) / math.sqrt(MITIGATION_DRAWS)

    def _normals(self, n: int) -> NDArray[np.float64]:
        pairs = (n + 1) // 2
        words = np.frombuffer(self._keystream(16 * pairs), dtype=np.uint64).reshape(2, pairs)
        top53 = (words >> np.uint64(11)).astype(np.float64)
        u1 = (top53[0] + 0.5) * 2.0**-53
        u2 = top53[1] * 2.0**-53
        radius = np.sqrt(-2.0 * np.log(u1))
        # cos and sin through torch: its vectorised float64 kernels (1 ulp) take a third of NumPy's scalar libm
        # loop, which was most of the cost of a draw (issue 13).
        angle = torch.from_numpy(2.0 * np.pi * u2)
        out = np.empty(2 * pairs)
        np.multiply(radius, torch.cos(angle).numpy(), out=out[:pairs])
        np.multiply(radius, torch.sin(angle).numpy(), out=out[pairs:])
        return out[:n]

    def _keystream(self, nbytes: int) -> bytes:
        # cryptography's 16-byte ChaCha20 nonce is a 32-bit block counter (here 0) then a 96-bit nonce.
        nonce = bytes(4) + os.urandom(12)
        encryptor = Cipher(algorithms.ChaCha20(self._key, nonce), mode=None).encryptor()
        return encryptor.update(bytes(nbytes))


def use_secure_noise(optimizer: Any, source: SecureGaussian) -> None:
    """Make an Opacus DP optimizer (``DPOptimizer`` or the ghost-clipping one) draw its noise from ``source``.

    Replaces the instance's ``add_noise`` with the same computation as Opacus 1.6's (std = noise multiplier x
    clip norm, added to each parameter's clipped sum), with the noise from ``source`` instead of torch's
    generator. Opacus' bookkeeping flags are kept, so a skipped or repeated step still fails as it would in Opacus.
    """
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise() -> None:
        multiplier = getattr(optimizer, "_adjusted_noise_multiplier", optimizer.noise_multiplier)
        std = float(multiplier) * float(optimizer.max_grad_norm)
        for p in optimizer.params:
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + source.noise(std, p.summed_grad)).view_as(p)
            _mark_as_processed(p.summed_grad)

    optimizer.add_noise = add_noise
