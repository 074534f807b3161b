"""Compressed model updates: b-bit stochastic-rounding quantization of the update ``w_local - w_global``.

Each floating-point tensor of the update is mapped affinely onto the integers ``0 .. 2^b - 1`` (per-tensor
``lo``/``scale``) with *stochastic* rounding, so the dequantized update is an unbiased estimate of the true one
(E[q] = x): averaging many clients' updates cancels the rounding error instead of accumulating a bias. Integer and
0-d tensors travel unchanged. Quantization happens after any DP noise (post-processing cannot weaken DP).

Wire layout inside the reply's ArrayRecord::

    "k"            uint8 / uint16 codes of each quantized tensor k, same shape as the tensor
    "__quant__"    float32 (m, 2): ``lo, scale`` of the m quantized tensors, in the global model's key order

One side array instead of two per tensor: every array on the wire carries a ~130-byte header, which for small
models would otherwise eat much of the saving.

Under SecAgg+ the update is not quantized here but into the secure-aggregation field (:func:`secagg_field`): the
server must add the clients' values without seeing them, so all clients share one fixed grid instead of per-tensor
``lo``/``scale``, and the field needs room for the sum of every client's value. The masked values then travel in
the narrowest unsigned integer type that holds the field (:func:`wire_dtype`).
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, ProtocolError

__all__ = [
    "QUANT_BITS",
    "SECAGG_NARROW_KEY",
    "dequantize_update",
    "is_quantized",
    "quantize_update",
    "secagg_field",
    "wire_dtype",
]

QUANT_BITS = (8, 16)
_DTYPES = {8: np.uint8, 16: np.uint16}
META = "__quant__"

#: Key in the SecAgg+ masked-vector request asking the client to send its masked vector in :func:`wire_dtype`.
SECAGG_NARROW_KEY = "fedshield-narrow-masked-vectors"
_WIRE_DTYPES = (np.uint8, np.uint16, np.uint32)


def _quantizable(arr: np.ndarray) -> bool:
    return bool(np.issubdtype(arr.dtype, np.floating) and arr.ndim > 0 and arr.size > 0)


def quantize_update(
    update: dict[str, np.ndarray], *, bits: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Quantize every float tensor of ``update`` to ``bits`` bits; never mutates the input."""
    if bits not in QUANT_BITS:
        raise ConfigError(f"quantize must be one of {QUANT_BITS} bits, got {bits}")
    if META in update:
        raise ProtocolError(f"update key {META!r} collides with the quantization side-channel name")
    levels = 2**bits - 1
    out: dict[str, np.ndarray] = {}
    meta: list[tuple[float, float]] = []
    for key, value in update.items():
        arr = np.asarray(value)
        if not _quantizable(arr):
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
        meta.append((lo, scale))
    out[META] = np.asarray(meta, dtype=np.float32).reshape(-1, 2)
    return out


def is_quantized(arrays: dict[str, np.ndarray]) -> bool:
    return META in arrays


def dequantize_update(
    arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Inverse of :func:`quantize_update`, shaped and typed like ``reference`` (the global model)."""
    meta = np.asarray(arrays.get(META, np.zeros((0, 2), np.float32)))
    quantized = [k for k, ref in reference.items() if _quantizable(np.asarray(ref))]
    if meta.shape != (len(quantized), 2):
        raise ProtocolError(f"quantized update has side data for {meta.shape[0]} tensors, expected {len(quantized)}")
    scales = {k: (float(lo), float(scale)) for k, (lo, scale) in zip(quantized, meta)}
    out: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        if key not in arrays:
            raise ProtocolError(f"quantized update lacks tensor {key!r} of the global model")
        codes = np.asarray(arrays[key])
        if key in scales:
            if codes.shape != np.shape(ref):
                raise ProtocolError(f"quantized tensor {key!r} has shape {codes.shape}, expected {np.shape(ref)}")
            lo, scale = scales[key]
            out[key] = (lo + codes.astype(np.float64) * scale).astype(np.asarray(ref).dtype)
        else:
            out[key] = codes.copy()
    return out


def secagg_field(bits: int, num_clients: int) -> tuple[int, int]:
    """``(quantization_range, modulus_range)`` of a SecAgg+ field for ``bits``-bit updates from ``num_clients``.

    Flower's ``secaggplus_mod`` maps each clipped value onto the integers ``0 .. quantization_range`` inclusive (and
    folds in a weight ``round(num_examples / max_weight * quantization_range)``, at most ``quantization_range``
    while counts stay within ``max_weight``). So ``2**bits - 1`` is the range whose every value fits in ``bits``
    bits, and the sum of ``num_clients`` such values is at most ``num_clients * (2**bits - 1)``: the modulus is the
    smallest power of two above that (at most ``2**(bits + ceil(log2(num_clients)))``), so the sum never wraps.
    """
    if bits not in QUANT_BITS:
        raise ConfigError(f"a SecAgg+ field is sized for one of {QUANT_BITS} bits per value, got {bits!r}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 2:
        raise ConfigError(f"a SecAgg+ field needs at least 2 clients, got {num_clients!r}")
    levels = 2**bits - 1
    modulus = 1 << (num_clients * levels).bit_length()
    if modulus > 2**32:
        raise ConfigError(f"{num_clients} clients' {bits}-bit values do not fit SecAgg+'s largest field (2**32): "
                          "sample fewer clients per round, or use 8 bits")
    return levels, modulus


def wire_dtype(modulus_range: int) -> np.dtype:
    """The narrowest unsigned numpy type that holds every value of ``[0, modulus_range)`` (a masked value)."""
    for dtype in _WIRE_DTYPES:
        if modulus_range - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ConfigError(f"modulus_range {modulus_range} does not fit 32 bits: SecAgg+ allows at most 2**32")
