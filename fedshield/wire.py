"""One object per model on the wire: a message's arrays packed into a single Flower ``Array``, unpacked on arrival.

Why: Flower 1.39 moves a message as a tree of objects, one request each (``PushObject``/``PullObject``) on every
hop: ServerApp -> SuperLink -> SuperNode -> ClientApp and back. An ``ArrayRecord`` is one object, plus one per
array, plus one per 5 MB chunk of each array, so a model of ``k`` tensors costs ``2k + 4`` requests per message
and hop, and the SuperLink spends ~10 ms of Python (gRPC, node-signature check, SQLAlchemy) on each. For the
digits CNN (6 tensors) a message was 16 objects; packed it is 6, whatever the model's number of tensors, plus one
per 5 MB. The model's bytes travel unchanged: each array's Flower fields (dtype, shape, serialisation type and its
bytes) are concatenated behind a JSON table, and unpacking rebuilds exactly the same ``Array`` objects, so nothing
above this layer can tell (and Flower's own ``Array.numpy`` still parses each array, ``allow_pickle=False``).

Who packs: the server's grid (:class:`~fedshield.strategies.streaming.StreamingGrid`) packs what it sends and
unpacks what it receives; the ClientApp's outermost mod unpacks a packed message and packs its reply the same way.
A message that arrived unpacked gets an unpacked reply, so a fedshield site still answers any server that does not
pack; a fedshield server talks to fedshield sites only (its round settings need fedshield's ClientApp anyway), and a
site of a fedshield older than this module refuses its packed messages with Flower's "Unsupported serialization
type" error. The receiver checks the table strictly before it believes a byte: a hostile peer gets a
:class:`ProtocolError`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, RecordDict

from .arrays import array_record
from .errors import ProtocolError
from .flower_internals.records import array_from_fields

__all__ = ["PACKED_KEY", "PACKED_STYPE", "pack_content", "pack_record", "unpack_content", "unpack_record"]

#: The one key of a packed ArrayRecord, and its Array's serialisation type (no numpy parser accepts it).
PACKED_KEY = "__fedshield_packed__"
PACKED_STYPE = "fedshield.packed.v1"
_LENGTH = struct.Struct("<Q")
#: A table entry is ~100 bytes; 64 MiB of table (~600k tensors) is far beyond any model and bounds a hostile one.
_MAX_TABLE_BYTES = 64 << 20


def pack_record(record: ArrayRecord) -> ArrayRecord:
    """``record`` as one Array (a record of fewer than two arrays is returned as it is: nothing to save)."""
    if len(record) < 2:
        return record
    table, blobs = [], []
    for key, array in record.items():
        table.append([key, array.dtype, list(array.shape), array.stype, len(array.data)])
        blobs.append(array.data)
    head = json.dumps(table, separators=(",", ":")).encode()
    data = b"".join([_LENGTH.pack(len(head)), head, *blobs])
    packed = array_from_fields("uint8", (len(data),), PACKED_STYPE, data)
    return array_record({PACKED_KEY: packed})


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The ArrayRecord that :func:`pack_record` packed (any other record is returned as it is).

    Raises :class:`ProtocolError` naming what is wrong when the packed array is malformed: a peer that sends one is
    broken or hostile, and nothing of it is used."""
    if PACKED_KEY not in record:
        return record
    if len(record) != 1:
        raise ProtocolError(f"a packed ArrayRecord holds only {PACKED_KEY!r}, got keys {sorted(record)[:5]}: the "
                            "peer runs an incompatible fedshield; run the same version on both sides")
    packed = record[PACKED_KEY]
    if packed.stype != PACKED_STYPE:
        raise ProtocolError(f"{PACKED_KEY!r} has serialisation type {packed.stype!r}, expected {PACKED_STYPE!r}: "
                            "the peer runs an incompatible fedshield; run the same version on both sides")
    table, offset, data = _read_table(packed.data)
    arrays: dict[str, Array] = {}
    for key, dtype, shape, stype, size in table:
        if key in arrays:
            raise ProtocolError(f"packed ArrayRecord names array {key!r} twice: refused (a broken or hostile peer)")
        # the table's fields were checked (_read_table): str, list of ints >= 0, str; a bytes slice
        arrays[key] = array_from_fields(dtype, tuple(shape), stype, data[offset:offset + size])
        offset += size
    if offset != len(data):
        raise ProtocolError(f"packed ArrayRecord has {len(data) - offset} bytes its table does not account for: "
                            "refused (a broken or hostile peer)")
    return array_record(arrays)


def _read_table(data: bytes) -> tuple[list[tuple[str, str, list[int], str, int]], int, bytes]:
    """The packed buffer's table, where its arrays start, and the buffer; every field checked."""
    if len(data) < _LENGTH.size:
        raise ProtocolError(f"packed ArrayRecord is {len(data)} bytes, too short for its table: refused")
    (head_size,) = _LENGTH.unpack_from(data)
    start = _LENGTH.size + head_size
    if head_size > _MAX_TABLE_BYTES or start > len(data):
        raise ProtocolError(f"packed ArrayRecord announces a {head_size}-byte table in {len(data)} bytes: refused")
    try:
        table = json.loads(data[_LENGTH.size:start])
    except ValueError as error:
        raise ProtocolError(f"packed ArrayRecord's table is not JSON ({error}): refused") from None
    if not isinstance(table, list) or not all(_entry_ok(entry) for entry in table):
        raise ProtocolError("packed ArrayRecord's table must list [key, dtype, shape, stype, size] entries with "
                            "str, str, non-negative ints, str, non-negative int: refused")
    if start + sum(entry[4] for entry in table) > len(data):
        raise ProtocolError(f"packed ArrayRecord's table claims more bytes than its {len(data)}: refused")
    return [tuple(entry) for entry in table], start, data  # type: ignore[misc]


def _entry_ok(entry: object) -> bool:
    if not (isinstance(entry, list) and len(entry) == 5):
        return False
    key, dtype, shape, stype, size = entry
    return (isinstance(key, str) and isinstance(dtype, str) and isinstance(stype, str)
            and isinstance(shape, list) and all(_count(d) for d in shape) and _count(size))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def pack_content(content: RecordDict, cache: dict[int, tuple[ArrayRecord, ArrayRecord]] | None = None) -> RecordDict:
    """``content`` with every ArrayRecord packed; its other records are the same objects.

    ``cache`` (id of a record -> the record and its packed form) lets a batch of messages that share one model
    record (a broadcast) pack it once; it keeps each record alive, so an id is never reused while it is there."""
    cache = {} if cache is None else cache

    def packed(record: ArrayRecord) -> ArrayRecord:
        if id(record) not in cache:
            cache[id(record)] = (record, pack_record(record))
        return cache[id(record)][1]

    return RecordDict({name: packed(rec) if isinstance(rec, ArrayRecord) else rec for name, rec in content.items()})


def unpack_content(content: RecordDict) -> tuple[RecordDict, bool]:
    """``content`` with every packed ArrayRecord unpacked, and whether any was packed (then reply packed too)."""
    names = _packed_names(content.array_records.items())
    if not names:
        return content, False
    return RecordDict({name: unpack_record(rec) if name in names else rec for name, rec in content.items()}), True


def _packed_names(records: Iterable[tuple[str, ArrayRecord]]) -> set[str]:
    return {name for name, record in records if PACKED_KEY in record}
