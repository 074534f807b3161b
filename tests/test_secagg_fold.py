"""The server's SecAgg+ arithmetic in O(model) memory gives exactly what the listed, int64 arithmetic gave.

fedshield.strategies._secagg_fold keeps the running masked sum in uint32 (wrapping modulo 2**32, a multiple of every
power-of-two field), strips masks a chunk at a time, reads replies as views over their bytes, and dequantises in
place. Each check compares against the arithmetic it replaced, spelled out here with whole int64 vectors and
Flower's own helpers (``bytes_to_ndarray``, ``dequantize``, ``parameters_*``), and demands equal values.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.ndarrays_arithmetic import parameters_addition, parameters_mod, parameters_subtraction
from flwr.common.secure_aggregation.quantization import dequantize

from fedshield.crypto.prg import expand_mask, mask_chunks
from fedshield.strategies._secagg_fold import FieldSum
from fedshield.strategies._secagg_params import ProtocolParams
from fedshield.strategies._secagg_stages import masked_sum, npy_view, weighted_average

SHAPES = [(1,), (3, 4), (), (50,)]  # a 0-d array and a boundary between arrays inside one mask chunk


def _vectors(modulus: int, dtype: type, count: int, seed: int = 0) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(0, modulus, size=s, dtype=np.int64).astype(dtype) for s in SHAPES] for _ in range(count)]


@pytest.mark.parametrize(("modulus", "dtype"), [(2**32, np.uint32), (2**32, np.int64), (2**20, np.uint32),
                                                (2**9, np.uint16), (2**8, np.uint8)])
def test_fold_and_in_place_unmasking_equal_the_int64_arithmetic(modulus: int, dtype: type) -> None:
    vectors = _vectors(modulus, dtype, 7)
    seeds = [bytes([i]) * 32 for i in range(5)]
    signs = [-1, 1, -1, -1, 1]  # self masks are subtracted; a dead node's pairwise masks either way
    field = FieldSum(modulus)
    field.chunk = 7  # chunks that straddle arrays, and a remainder
    for vec in vectors:
        field.add(vec)
    for seed, sign in zip(seeds, signs, strict=True):
        field.add_mask(seed, sign)
    # before: every vector widened to int64, summed, then whole int64 masks added or subtracted
    want = masked_sum([[np.asarray(a, dtype=np.int64) for a in v] for v in vectors], modulus)
    for seed, sign in zip(seeds, signs, strict=True):
        op = parameters_addition if sign > 0 else parameters_subtraction
        want = op(want, expand_mask(seed, modulus, SHAPES))
    want = parameters_mod(want, modulus)
    got = field.value()
    assert field.total is not None and field.total[0].dtype == np.uint32  # one fp32 model's worth, not int64's two
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and np.array_equal(g, w)
        assert g.min(initial=0) >= 0 and g.max(initial=0) < modulus


def test_other_moduli_keep_an_int64_sum_and_bad_vectors_are_refused() -> None:
    vectors = _vectors(1000, np.int64, 4)
    field = FieldSum(1000)  # not a power of two: no wrap-around trick, int64 reduced at every step
    for vec in vectors:
        field.add(vec)
    field.add_mask(bytes(32), -1)
    want = parameters_mod(parameters_subtraction(masked_sum(vectors, 1000), expand_mask(bytes(32), 1000, SHAPES)),
                          1000)
    assert all(np.array_equal(g, w) for g, w in zip(field.value(), want, strict=True))
    with pytest.raises(TypeError, match="integers"):
        field.add([np.zeros(s, dtype=np.float32) for s in SHAPES])
    with pytest.raises(ValueError, match="shape"):
        field.add([np.zeros(s, dtype=np.int64) for s in [(1,), (4, 3), (), (50,)]])
    with pytest.raises(ValueError, match="no masked vectors"):
        FieldSum(2**32).value()
    with pytest.raises(ValueError, match="power-of-two"):
        next(mask_chunks(bytes(32), 1000, 10))


def test_mask_chunks_are_expand_mask_cut_into_pieces() -> None:
    whole = expand_mask(bytes(range(32)), 2**20, [(1000,)])[0]
    pieces = np.concatenate(list(mask_chunks(bytes(range(32)), 2**20, 1000, chunk=333)))
    assert pieces.dtype == np.uint32 and np.array_equal(pieces, whole)


@pytest.mark.parametrize("arr", [np.arange(24, dtype=np.uint32).reshape(2, 3, 4), np.array(7, dtype=np.int64),
                                 np.zeros((0, 3), dtype=np.uint16), np.asfortranarray(np.arange(6).reshape(2, 3))])
def test_npy_view_reads_flowers_bytes_without_copying(arr: np.ndarray) -> None:
    data = ndarray_to_bytes(arr)
    got, want = npy_view(data), bytes_to_ndarray(data)
    assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    if got.size:
        assert np.shares_memory(got, np.frombuffer(data, dtype=np.uint8))  # a view, not a copy
    with pytest.raises(ValueError):
        npy_view(data[: len(data) - 1] if got.size else b"not an npy file")
    with pytest.raises(ValueError, match="version"):
        npy_view(b"\x93NUMPY\x09\x00")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|O", "fortran_order": False, "shape": (2,)})
    with pytest.raises(TypeError, match="objects"):
        npy_view(header.getvalue() + bytes(16))


def test_in_place_dequantisation_is_bit_identical_to_flowers_expression() -> None:
    params = ProtocolParams(num_samples=3, num_shares=3, threshold=2, clipping_range=8.0, quantization_range=2**22,
                            modulus_range=2**32, max_weight=1000.0)
    rng = np.random.default_rng(1)
    body = [rng.integers(0, 3 * 2**22, size=s, dtype=np.int64).astype(np.uint32) for s in SHAPES]
    unmasked = [np.array([12345], dtype=np.uint32), *body]
    q_total, got = weighted_average(unmasked, params, 3)
    # before: Flower's dequantize, then (s + offset) * scale as new arrays
    summed = dequantize([np.asarray(b, dtype=np.int64) for b in body], 8.0, 2**22)
    want = [np.asarray((np.asarray(s, dtype=np.float64) + -2 * 8.0) * (2**22 / 12345)) for s in summed]
    assert q_total == 12345
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float64 and g.shape == w.shape and np.array_equal(g, w)
