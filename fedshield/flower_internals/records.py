"""Flower record objects made from parts that were checked already, without Flower's checking constructors.

Why: on a simulated round's hot path (issue 13) Flower's constructors check, field by field, what fedshield has
just checked or what a checked object already holds: ``Array(dtype=, shape=, stype=, data=)`` costs ~5 us (its
argument juggling, and a dirty-flag update per field), ``ConfigRecord(dict)`` 3-4 us per value. These functions
build the same objects (the attributes Flower 1.39's constructors set, nothing else), for callers that guarantee
the types. ``tests/test_serde.py`` compares each with what Flower's own constructor gives.
"""

from __future__ import annotations

from flwr.app import Array, ConfigRecord

__all__ = ["array_from_fields", "copy_config_record"]


def array_from_fields(dtype: str, shape: tuple[int, ...], stype: str, data: bytes) -> Array:
    """``Array(dtype=dtype, shape=shape, stype=stype, data=data)``: the caller guarantees str, tuple of int, str,
    bytes (the checks Flower's constructor would make)."""
    array = Array.__new__(Array)
    array.__dict__.update(_is_dirty=True, dtype=dtype, shape=shape, stype=stype, data=data)
    return array


def copy_config_record(record: ConfigRecord) -> ConfigRecord:
    """An independent copy of a checked ``ConfigRecord``, without checking each value again: the attributes
    ``ConfigRecord.__init__`` sets (Flower 1.39's ``TypedDict``), a new dict, new lists."""
    copy = ConfigRecord.__new__(ConfigRecord)
    state = record.__dict__
    copy.__dict__.update(_check_key_fn=state["_check_key_fn"], _check_value_fn=state["_check_value_fn"],
                         _data={k: list(v) if isinstance(v, list) else v for k, v in state["_data"].items()})
    return copy
