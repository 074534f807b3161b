"""Compressed model updates: b-bit stochastic-rounding quantization of the update ``w_local - w_global``.

Each floating-point tensor of the update is mapped affinely onto the integers ``0 .. 2^b - 1`` (per-tensor
``lo``/``scale``) with *stochastic* rounding, so the dequantized update is an unbiased estimate of the true one
(E[q] = x): averaging many clients' updates cancels the rounding error instead of accumulating a bias. Integer and
0-d tensors travel unchanged. Quantization happens after any DP noise (post-processing cannot weaken DP).

Wire layout inside the reply's ArrayRecord, for a quantized tensor ``k``::

    "k"            uint8 / uint16 codes, same shape as the tensor
    "k::lo"        float32 scalar
    "k::scale"     float32 scalar  (0 for a constant tensor)
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, ProtocolError

__all__ = ["QUANT_BITS", "quantize_update", "dequantize_update", "is_quantized"]

QUANT_BITS = (8, 16)
_DTYPES = {8: np.uint8, 16: np.uint16}
_LO, _SCALE = "::lo", "::scale"


def quantize_update(
    update: dict[str, np.ndarray], *, bits: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Quantize every float tensor of ``update`` to ``bits`` bits; never mutates the input."""
    if bits not in QUANT_BITS:
        raise ConfigError(f"quantize must be one of {QUANT_BITS} bits, got {bits}")
    levels = 2**bits - 1
    out: dict[str, np.ndarray] = {}
    for key, value in update.items():
        arr = np.asarray(value)
        if _LO in key or _SCALE in key:
            raise ProtocolError(f"update key {key!r} collides with the quantization side-channel names")
        if not np.issubdtype(arr.dtype, np.floating) or arr.ndim == 0 or arr.size == 0:
            out[key] = arr.copy()
            continue
        lo, hi = float(arr.min()), float(arr.max())
        scale = (hi - lo) / levels if hi > lo else 0.0
        if scale == 0.0:
            codes = np.zeros(arr.shape, dtype=_DTYPES[bits])
        else:
            pos = (arr.astype(np.float64) - lo) / scale
            floor = np.floor(pos)
            codes = (floor + (rng.random(arr.shape) < (pos - floor))).clip(0, levels).astype(_DTYPES[bits])
        out[key] = codes
        out[key + _LO] = np.asarray(lo, dtype=np.float32)
        out[key + _SCALE] = np.asarray(scale, dtype=np.float32)
    return out


def is_quantized(arrays: dict[str, np.ndarray]) -> bool:
    return any(k.endswith(_SCALE) for k in arrays)


def dequantize_update(
    arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`quantize_update`, shaped and typed like ``reference`` (the global model)."""
    out: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        if key not in arrays:
            raise ProtocolError(f"quantized update lacks tensor {key!r} of the global model")
        codes = np.asarray(arrays[key])
        if key + _SCALE in arrays:
            lo = float(arrays[key + _LO])
            scale = float(arrays[key + _SCALE])
            if codes.shape != np.shape(ref):
                raise ProtocolError(f"quantized tensor {key!r} has shape {codes.shape}, expected {np.shape(ref)}")
            out[key] = (lo + codes.astype(np.float64) * scale).astype(np.asarray(ref).dtype)
        else:
            out[key] = codes.copy()
    return out
