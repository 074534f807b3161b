"""fedshield.arrays.to_numpy: the same array as Flower's ``Array.numpy()``, and the same refusals."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedshield.arrays import array_record, from_numpy, record_to_numpy, to_numpy

RNG = np.random.default_rng(7)
CASES = {
    "float32 conv": RNG.standard_normal((32, 1, 3, 3)).astype(np.float32),
    "float64 0-d": np.asarray(3.5),
    "int64 empty": np.arange(0),
    "empty middle axis": np.zeros((2, 0, 3)),
    "fortran order": np.asfortranarray(RNG.standard_normal((3, 4))),
    "big-endian int32": np.array([1, -2, 3], dtype=">i4"),
    "bool": np.array([True, False, True]),
    "unicode": np.array(["ab", "c"]),
    "structured": np.array([(1, 2.0)], dtype=[("a", "<i4"), ("b", "<f8")]),
    "float16 3-d": RNG.standard_normal((2, 3, 4)).astype(np.float16),
}


def _raw(data: bytes, dtype: str = "float32", shape: tuple[int, ...] = (1,)) -> Array:
    return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data)


def _npy(value: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buf = io.BytesIO()
    if version is None:
        np.save(buf, value, allow_pickle=False)
    else:
        np.lib.format.write_array(buf, value, version=version, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_array_as_flower(name: str) -> None:
    array = Array(CASES[name])
    ours, flowers = to_numpy(array), array.numpy()
    assert ours.dtype == flowers.dtype and ours.shape == flowers.shape
    assert np.array_equal(ours, flowers)
    assert ours.flags.writeable and ours.flags.f_contiguous == flowers.flags.f_contiguous
    assert ours.tobytes(order="A") == flowers.tobytes(order="A")


@pytest.mark.parametrize("version", [(1, 0), (2, 0), (3, 0)])
def test_every_npy_version(version: tuple[int, int]) -> None:
    value = RNG.standard_normal((4, 5))
    assert np.array_equal(to_numpy(_raw(_npy(value, version), "float64", (4, 5))), value)


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_view_is_the_same_array_read_only(name: str) -> None:
    array = Array(CASES[name])
    view, flowers = to_numpy(array, copy=False), array.numpy()
    assert view.dtype == flowers.dtype and view.shape == flowers.shape and np.array_equal(view, flowers)
    assert not view.flags.writeable
    if view.dtype.itemsize and view.size:  # a view of the Array's own bytes, not a copy
        assert np.shares_memory(view, np.frombuffer(array.data, dtype=np.uint8))
    with pytest.raises(ValueError, match="read-only"):
        view[...] = 0 if view.dtype.kind != "V" else view


def test_a_view_of_an_unknown_header_is_a_read_only_copy() -> None:
    value = RNG.standard_normal((4, 5))
    got = to_numpy(_raw(_npy(value, (3, 0)), "float64", (4, 5)), copy=False)  # .npy 3.0: np.load's path
    assert np.array_equal(got, value) and not got.flags.writeable


def test_a_view_refuses_what_a_copy_refuses() -> None:
    liar = _raw(_npy(np.zeros((2, 3), np.float32)), "float32", (3, 2))  # declares one shape, sends another
    with pytest.raises(ValueError, match="declares"):
        to_numpy(liar, copy=False)
    short = _raw(_npy(np.zeros(8, np.float32))[:-4], "float32", (8,))
    with pytest.raises(ValueError, match="truncated"):
        to_numpy(short, copy=False)


def test_a_result_is_its_own_copy() -> None:
    array = Array(np.arange(6, dtype=np.float64))
    first = to_numpy(array)
    first[:] = -1.0
    assert np.array_equal(to_numpy(array), np.arange(6, dtype=np.float64))


def test_same_header_different_data() -> None:
    """The header cache is keyed by the header's bytes only; the values always come from this array's data."""
    a, b = RNG.standard_normal(8), RNG.standard_normal(8)
    assert np.array_equal(to_numpy(Array(a)), a) and np.array_equal(to_numpy(Array(b)), b)


def test_object_arrays_are_refused_as_flower_refuses_them() -> None:
    data = _npy(np.array([1], dtype=np.int64)).replace(b"'<i8'", b"'|O' ")
    with pytest.raises(ValueError, match="allow_pickle=False"):
        _raw(data).numpy()
    with pytest.raises(ValueError, match="allow_pickle=False"):
        to_numpy(_raw(data))


@pytest.mark.parametrize("shape", [(-1,), (2, -3)])
def test_a_negative_dimension_is_refused_as_flower_refuses_it(shape: tuple[int, ...]) -> None:
    """A hostile peer's header claiming shape (-1,) must not become "all the bytes there are"."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": shape})
    data = buf.getvalue() + np.arange(6, dtype=np.float64).tobytes()
    with pytest.raises(ValueError):
        _raw(data).numpy()
    with pytest.raises(ValueError):
        to_numpy(_raw(data))


def test_truncated_data_is_refused() -> None:
    data = _npy(np.arange(10, dtype=np.float64))[:-8]
    with pytest.raises(ValueError):
        _raw(data).numpy()
    with pytest.raises(ValueError, match="truncated"):
        to_numpy(_raw(data))


@pytest.mark.parametrize("data", [b"", b"not an array at all", b"\x93NUMPY\x01\x00\x50\x00{'descr': nonsense"],
                         ids=["empty", "no magic", "bad header"])
def test_malformed_bytes_fail_like_flower(data: bytes) -> None:
    with pytest.raises((ValueError, EOFError)) as flowers:
        _raw(data).numpy()
    with pytest.raises(flowers.type):
        to_numpy(_raw(data))


def test_foreign_serialisation_type_is_flowers_type_error() -> None:
    array = Array(dtype="uint8", shape=(3,), stype="fedshield.packed.v1", data=b"abc")
    with pytest.raises(TypeError, match="Unsupported serialization type"):
        to_numpy(array)


def test_record_to_numpy_decodes_every_array() -> None:
    record = ArrayRecord({"w": Array(CASES["float32 conv"]), "b": Array(CASES["float64 0-d"])})
    out = record_to_numpy(record)
    assert list(out) == ["w", "b"]
    assert np.array_equal(out["w"], CASES["float32 conv"]) and out["b"].shape == ()


@pytest.mark.parametrize("name", sorted(CASES))
def test_from_numpy_writes_flowers_bytes(name: str) -> None:
    for _ in range(2):  # the second call reuses the cached header
        ours, flowers = from_numpy(CASES[name]), Array(CASES[name])
        assert (ours.dtype, tuple(ours.shape), ours.stype, ours.data) == (
            flowers.dtype, tuple(flowers.shape), flowers.stype, flowers.data)


def test_from_numpy_of_a_non_contiguous_view_and_a_fortran_array() -> None:
    base = RNG.standard_normal((6, 8))
    for value in (base[::2, 1::3], np.asfortranarray(base), base.T):
        assert from_numpy(value).data == Array(value).data
        assert np.array_equal(to_numpy(from_numpy(value)), value)


def test_from_numpy_refuses_object_arrays() -> None:
    with pytest.raises(ValueError, match="allow_pickle=False"):
        from_numpy(np.array([{"a": 1}], dtype=object))


@pytest.mark.parametrize(("declared_dtype", "declared_shape"), [("float32", (3,)), ("float64", (2,)), ("float64", (3, 1))])
def test_bytes_that_disagree_with_the_declared_dtype_or_shape_are_refused(
        declared_dtype: str, declared_shape: tuple[int, ...]) -> None:
    """Validation compares an Array's declared fields with the global model's; the bytes must be what they say."""
    lying = Array(dtype=declared_dtype, shape=declared_shape, stype="numpy.ndarray",
                  data=Array(np.zeros(3, dtype=np.float64)).data)
    with pytest.raises(ValueError, match="declares"):
        to_numpy(lying)


def test_zero_itemsize_dtypes_read_as_flower_reads_them() -> None:
    for value in (np.array([b"", b""], dtype="S0"), np.zeros(3, dtype="V0")):
        array = Array(value)
        assert to_numpy(array).dtype == array.numpy().dtype and to_numpy(array).shape == array.numpy().shape



def test_array_record_holds_the_very_arrays_and_equals_flowers_record() -> None:
    arrays = {"w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)), "b": Array(np.zeros(3))}
    record = array_record(arrays)
    assert list(record) == ["w", "b"] and all(record[k] is arrays[k] for k in arrays)
    assert record == ArrayRecord(arrays) and record.object_id == ArrayRecord(arrays).object_id
    with pytest.raises(TypeError):  # the record's own checks still apply
        array_record({"x": np.zeros(2)})  # type: ignore[dict-item]
