"""A Flower ``Array`` as a NumPy array, without parsing the same ``.npy`` header again for every array of every reply.

Why: Flower's ``Array.numpy()`` is ``np.load(BytesIO(data), allow_pickle=False)``, and ``np.load`` parses the
array's header (a Python literal) with ``ast`` each time: ~0.3 ms per array. A simulated round of 10 clients and
a 6-tensor model decoded 120 arrays on the server (screening, then the weighted sum), 40 ms of the round's critical
path, and every header was one of the same six. :func:`to_numpy` parses a header once per distinct header bytes
(with NumPy's own public ``read_array_header_1_0``/``_2_0``) and then only slices the data.

It returns what ``Array.numpy()`` returns, an equal, writable array of the same dtype, shape and memory order (with
``copy=False``, the same values read-only: see :func:`to_numpy`), and
refuses what it refuses: object dtypes (``allow_pickle=False``), negative dimensions, a header NumPy cannot parse or
data shorter than the header says (``ValueError``), a serialisation type other than NumPy's (``TypeError``). One
refusal more: bytes whose header disagrees with the ``Array``'s declared ``dtype`` and ``shape`` (what validation
compares with the global model) are a ``ValueError``, not a differently shaped array. Header formats
this fast path does not know (``.npy`` version 3) go to ``Array.numpy()`` itself. :func:`from_numpy` is the other
direction, byte for byte what ``Array(ndarray)`` writes, with ``np.save``'s header reused per dtype and shape.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
from flwr.app import Array, ArrayRecord

from .flower_internals.records import array_from_fields

__all__ = ["array_record", "from_numpy", "to_numpy", "record_to_numpy"]

_MAGIC = b"\x93NUMPY"
_NUMPY_STYPE = "numpy.ndarray"
#: Version -> how the header's length is stored right after the 8 bytes of magic and version.
_LENGTH_FIELDS = {1: struct.Struct("<H"), 2: struct.Struct("<I")}
#: A header is ~128 bytes and a model has a few hundred distinct ones at most; the bounds cap what a hostile
#: stream of distinct headers can make the cache hold (longer headers are parsed every time, as np.load does).
_CACHE_SIZE = 4096
_MAX_CACHED_HEADER = 1024
_SAVED_HEADERS: dict[tuple[np.dtype, tuple[int, ...], bool], bytes] = {}


def to_numpy(array: Array, *, copy: bool = True) -> np.ndarray:
    """``array.numpy()``, with the header parsed once per distinct header (see the module docstring).

    ``copy=False``: a read-only view of the array's own bytes (a read-only copy on the fallback paths) instead of a
    writable copy, for a caller that only
    reads it (the server screening and folding a reply: two copies of every array of every reply saved, and on
    arrays over 500 items each copy was also a GIL release and re-take inside the round, issue 13)."""
    if array.stype != _NUMPY_STYPE:
        return array.numpy()  # raises Flower's TypeError for a foreign serialisation type
    data = array.data
    offset = _data_offset(data)
    if offset is None:  # a header this fast path does not know: np.load's own copy, read-only if asked
        return array.numpy() if copy else _read_only(array.numpy())
    head = bytes(data[:offset])
    shape, fortran_order, dtype = _parse_header(head) if len(head) <= _MAX_CACHED_HEADER else _parse(head)
    if dtype.itemsize == 0:  # np.frombuffer refuses these; np.load reads them (empty strings, void)
        return _declared(array, array.numpy() if copy else _read_only(array.numpy()))
    count = math.prod(shape)
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"array data holds {len(data) - offset} bytes but its header describes {count} items of "
                         f"{dtype.itemsize} bytes: the array is truncated")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    if fortran_order:
        value = flat.reshape(shape[::-1]).transpose()
        return _declared(array, value.copy(order="K") if copy else _read_only(value))
    value = flat.reshape(shape)
    return _declared(array, value.copy() if copy else _read_only(value))


def _read_only(value: np.ndarray) -> np.ndarray:
    """``value`` marked read-only (a view of the Array's bytes: whatever buffer the bytes came in)."""
    value.flags.writeable = False
    return value


@lru_cache(maxsize=256)
def _dtype_name(dtype: np.dtype) -> str:
    """``str(dtype)`` of a built-in dtype, the name Flower's ``Array.dtype`` holds (NumPy builds it anew each call)."""
    return str(dtype)


def _declared(array: Array, value: np.ndarray) -> np.ndarray:
    """``value`` if it is what ``array`` declares (Flower's ``dtype`` and ``shape`` fields, which validation
    checks against the global model), else ``ValueError``: a peer that declares one shape and sends another would
    otherwise pass the checks and break, or retype, the aggregate."""
    name = _dtype_name(value.dtype) if value.dtype.isbuiltin else str(value.dtype)  # structured: no caching
    if name != array.dtype or tuple(value.shape) != tuple(array.shape):
        raise ValueError(f"array declares {array.dtype} {tuple(array.shape)} but its bytes hold {value.dtype} "
                         f"{tuple(value.shape)}")
    return value


def from_numpy(value: np.ndarray) -> Array:
    """``Array(value)`` (Flower's ``from_numpy_ndarray``, i.e. ``np.save(allow_pickle=False)``), byte for byte, with
    the header written by ``np.save`` once per (dtype, shape, order) and reused: a client's reply is the same six
    shapes every round."""
    fortran_order = bool(value.flags.f_contiguous and not value.flags.c_contiguous)
    key = (value.dtype, value.shape, fortran_order)
    head = _SAVED_HEADERS.get(key)
    if head is None:
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)  # refuses object dtypes, as Flower's does
        saved = buf.getvalue()
        head = saved[: len(saved) - value.nbytes]
        if len(_SAVED_HEADERS) >= _CACHE_SIZE:
            _SAVED_HEADERS.clear()
        _SAVED_HEADERS[key] = head
    data = head + value.tobytes(order="F" if fortran_order else "C")
    return array_from_fields(str(value.dtype), tuple(value.shape), _NUMPY_STYPE, data)


def array_record(arrays: Mapping[str, Array]) -> ArrayRecord:
    """An ``ArrayRecord`` holding these very ``Array`` objects, in this order.

    Why not ``ArrayRecord(arrays)``: Flower's dict constructor rebuilds every ``Array`` it is given (a copy of each
    one's fields through the checking constructor), which cost more than unpacking a packed model did, on the
    server for every reply and in the client for every message (issue 13). Each item still goes through the
    record's own key and value checks."""
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def record_to_numpy(record: Mapping[str, Array]) -> dict[str, np.ndarray]:
    """Every array of an ``ArrayRecord`` (or any mapping of Arrays) decoded with :func:`to_numpy`."""
    return {key: to_numpy(value) for key, value in record.items()}


def _data_offset(data: bytes) -> int | None:
    """Where the array's bytes start, for ``.npy`` versions 1 and 2; None for anything else (the slow path)."""
    if len(data) < 10 or data[:6] != _MAGIC:
        return None
    field = _LENGTH_FIELDS.get(data[6])
    if field is None or data[7] != 0 or len(data) < 8 + field.size:
        return None
    (header_len,) = field.unpack_from(data, 8)
    return 8 + field.size + header_len


@lru_cache(maxsize=_CACHE_SIZE)
def _parse_header(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, Fortran order, dtype) of one exact header; the bytes are the cache key, so a hit is the same parse."""
    return _parse(head)


def _parse(head: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    fp = io.BytesIO(head)
    major, _minor = np.lib.format.read_magic(fp)
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = reader(fp)
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    if any(int(n) < 0 for n in shape):  # np.load refuses these too; np.frombuffer(count=-1) would not
        raise ValueError(f"array header has a negative dimension: shape {tuple(shape)}")
    return tuple(int(n) for n in shape), bool(fortran_order), dtype
