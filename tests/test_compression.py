"""Quantized updates: unbiased stochastic rounding, error within one quantization step, shapes including 0-d and
empty, and at most 0.3x the bytes of float32 at 8 bits. And the SecAgg+ field sizes for quantized updates: the
smallest modulus that holds every possible sum, and the narrowest wire type that holds the modulus."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedshield.compression import dequantize_update, quantize_update, secagg_field, wire_dtype
from fedshield.errors import ConfigError, ProtocolError

SHAPES = {"w": (64, 32), "b": (32,), "scalar": (), "empty": (0, 4), "const": (5,)}


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {k: rng.normal(size=s).astype(np.float32) * 0.01 for k, s in SHAPES.items()}
    out["const"] = np.full((5,), 0.25, np.float32)
    out["steps"] = np.asarray(7, dtype=np.int64)
    return out


@pytest.mark.parametrize("bits", [8, 16])
def test_roundtrip_error_is_below_one_step_and_inputs_untouched(bits: int) -> None:
    upd = _update()
    before = {k: v.copy() for k, v in upd.items()}
    q = quantize_update(upd, bits=bits, rng=np.random.default_rng(1))
    back = dequantize_update(q, upd)
    for k, v in upd.items():
        np.testing.assert_array_equal(v, before[k])
        assert back[k].shape == v.shape and back[k].dtype == v.dtype
        if v.dtype.kind == "f" and v.size > 1:
            step = (v.max() - v.min()) / (2**bits - 1)
            assert np.max(np.abs(back[k] - v)) <= step * 1.0001 + 1e-12
    np.testing.assert_array_equal(back["scalar"], upd["scalar"])  # 0-d travels as is
    np.testing.assert_array_equal(back["const"], upd["const"])
    assert back["steps"] == 7


def test_stochastic_rounding_is_unbiased() -> None:
    x = {"w": np.linspace(-1, 1, 257, dtype=np.float32)}
    rng = np.random.default_rng(2)
    mean = np.mean([dequantize_update(quantize_update(x, bits=8, rng=rng), x)["w"] for _ in range(2000)], axis=0)
    step = 2 / 255
    # Each value's rounding error has std <= step/2; the mean of 2000 draws has std <= step/(2*sqrt(2000)).
    assert np.max(np.abs(mean - x["w"])) < 6 * step / (2 * np.sqrt(2000))


def test_eight_bits_cost_at_most_0_3x_float32() -> None:
    upd = {"w": np.random.default_rng(0).normal(size=(256, 128)).astype(np.float32)}
    q = quantize_update(upd, bits=8, rng=np.random.default_rng(0))
    assert sum(a.nbytes for a in q.values()) <= 0.3 * upd["w"].nbytes


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="one of"):
        quantize_update(_update(), bits=4, rng=np.random.default_rng(0))
    q = quantize_update(_update(), bits=8, rng=np.random.default_rng(0))
    with pytest.raises(ProtocolError, match="lacks tensor"):
        dequantize_update({k: v for k, v in q.items() if k != "w"}, _update())
    with pytest.raises(ProtocolError, match="collides"):
        quantize_update({"__quant__": np.ones(3, np.float32)}, bits=8, rng=np.random.default_rng(0))
    with pytest.raises(ProtocolError, match="side data"):
        dequantize_update({**q, "__quant__": q["__quant__"][:1]}, _update())


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("clients", [2, 3, 4, 5, 7, 8, 9, 100, 256, 257])
def test_secagg_field_is_the_smallest_that_holds_every_sum(bits: int, clients: int) -> None:
    levels, modulus = secagg_field(bits, clients)
    assert levels == 2**bits - 1  # values 0..levels: exactly `bits` bits per client
    assert modulus & (modulus - 1) == 0  # a power of two, as the masks need
    assert clients * levels < modulus <= 2 * clients * levels  # every sum fits, and no smaller power of two does
    assert modulus <= 2 ** (bits + math.ceil(math.log2(clients)))  # ceil(log2 N) extra bits at most (257: 8)
    # The largest sum, every client at +clipping_range, survives the field's mask arithmetic unchanged.
    total = np.full(3, levels, dtype=np.int64) * clients
    assert np.array_equal(total & (modulus - 1), total)


@pytest.mark.parametrize(
    ("modulus", "dtype"),
    [(2**8, np.uint8), (2**9, np.uint16), (2**16, np.uint16), (2**17, np.uint32), (2**32, np.uint32)],
)
def test_wire_dtype_is_the_narrowest_that_holds_the_modulus(modulus: int, dtype: type) -> None:
    assert wire_dtype(modulus) == np.dtype(dtype)
    top = np.asarray([modulus - 1], dtype=np.int64)
    assert int(top.astype(wire_dtype(modulus))[0]) == modulus - 1  # lossless


def test_secagg_field_bad_input() -> None:
    with pytest.raises(ConfigError, match="bits per value"):
        secagg_field(4, 5)
    with pytest.raises(ConfigError, match="at least 2 clients"):
        secagg_field(8, 1)
    with pytest.raises(ConfigError, match="largest field"):
        secagg_field(16, 70_000)
    with pytest.raises(ConfigError, match="32 bits"):
        wire_dtype(2**33)
