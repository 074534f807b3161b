"""Flower's own protobuf serialization of a ``Message`` and a ``Context`` (``flwr.common.serde``, ``flwr.proto``).

Why: the local simulation backend (:mod:`fedshield.simulation.local_pool`) hands each ClientApp call to a worker
process; Flower's wire format carries exactly what its SuperLink/SuperNode carry, so nothing is pickled.

The bytes are Flower's ``message_to_proto(message).SerializeToString()``, and a message decodes to what Flower's
``message_from_proto`` gives; two records are converted once instead of once per message (issue 13):

- encoding a request (``remember=True``): the records of a broadcast (the round's model and config, one object
  each, sent to every sampled client) keep the proto made for the first message while they hold what they held then
  (same keys, same values and value types, floats bit for bit, same ``Array`` objects holding the same bytes); a
  record changed in place is converted again. The last 4 are kept, none over 16 MiB.
- decoding: a ``ConfigRecord`` whose proto bytes were decoded before is copied from that decoding, skipping
  Flower's per-value type checks (3-4 us a value; a round's config holds 33), which its first decoding passed
  (:func:`~fedshield.flower_internals.records.copy_config_record`).
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Context as Context
from flwr.common import Message as Message
from flwr.common.serde import (
    array_record_from_proto,
    array_record_to_proto,
    config_record_from_proto,
    config_record_to_proto,
    context_from_proto,
    context_to_proto,
    error_from_proto,
    error_to_proto,
    metadata_from_proto,
    metadata_to_proto,
    metric_record_from_proto,
    metric_record_to_proto,
)
from flwr.app.message import make_message
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict  # pylint: disable=no-name-in-module

from .records import copy_config_record

__all__ = ["Context", "Message", "encode_message", "decode_message", "encode_context", "decode_context"]

_KEEP = 4  # records remembered on each side: a round's broadcast has two
#: A larger model record is not remembered (its proto would double what it holds); its conversion is a copy anyway.
_REMEMBER_BYTES = 16 * 2**20
_DOUBLE = struct.Struct("<d")


def _fingerprint(record: Any) -> tuple[Any, ...]:
    """What a record holds, equal only for records that encode to the same bytes: values with their types
    (``1 == 1.0 == True`` must not match), floats by their bits (``0.0 == -0.0`` must not match; NaNs by payload),
    and the ``Array`` objects with their bytes, held (so a replaced one is never mistaken for the one it replaced)."""
    if isinstance(record, ArrayRecord):
        return tuple((k, a, a.data, a.dtype, tuple(a.shape), a.stype) for k, a in record.items())
    return tuple((k, tuple(_exact(e) for e in v) if isinstance(v, list) else _exact(v)) for k, v in record.items())


def _exact(value: Any) -> tuple[type, Any]:
    return (float, _DOUBLE.pack(value)) if type(value) is float else (type(value), value)


class _Remembered:
    """The last few ``key -> (anchor, fingerprint, value)``; thread-safe (the engine encodes on several threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[Any, tuple[Any, Any, Any]] = OrderedDict()

    def get(self, key: Any, anchor: Any, mark: Any) -> Any:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None or hit[0] is not anchor or hit[1] != mark:
                return None
            self._entries.move_to_end(key)
            return hit[2]

    def put(self, key: Any, anchor: Any, mark: Any, value: Any) -> None:
        with self._lock:
            self._entries[key] = (anchor, mark, value)
            self._entries.move_to_end(key)
            while len(self._entries) > _KEEP:
                self._entries.popitem(last=False)


_encoded = _Remembered()
_decoded = _Remembered()


def _record_proto(record: Any, remember: bool) -> Any:
    if isinstance(record, MetricRecord):  # a reply's few metrics: never shared, nothing to gain
        return metric_record_to_proto(record)
    if not remember or (isinstance(record, ArrayRecord)
                        and sum(len(a.data) for a in record.values()) > _REMEMBER_BYTES):
        return array_record_to_proto(record) if isinstance(record, ArrayRecord) else config_record_to_proto(record)
    # Taken before the conversion: a record another thread changes meanwhile is remembered with what it held
    # before; it could only be hit again by a record holding that again, and changing a record while it is being
    # sent is a race in Flower already.
    mark = _fingerprint(record)
    proto = _encoded.get(id(record), record, mark)  # anchored to the record itself: its id is never reused here
    if proto is None:
        proto = array_record_to_proto(record) if isinstance(record, ArrayRecord) else config_record_to_proto(record)
        _encoded.put(id(record), record, mark, proto)
    return proto


def _recorddict_to_proto(content: RecordDict, remember: bool) -> ProtoRecordDict:
    """``flwr.common.serde.recorddict_to_proto``, each record through :func:`_record_proto`."""
    items = []
    for key, record in content.items():
        if isinstance(record, ArrayRecord):
            items.append(ProtoRecordDict.Item(key=key, array_record=_record_proto(record, remember)))
        elif isinstance(record, MetricRecord):
            items.append(ProtoRecordDict.Item(key=key, metric_record=_record_proto(record, remember)))
        elif isinstance(record, ConfigRecord):
            items.append(ProtoRecordDict.Item(key=key, config_record=_record_proto(record, remember)))
        else:
            raise ValueError(f"Unsupported record type: {type(record)}")
    return ProtoRecordDict(items=items)


def _config_from_proto(proto: Any) -> ConfigRecord:
    data = proto.SerializeToString()
    template = _decoded.get(data, None, None)
    if template is None:
        template = config_record_from_proto(proto)
        _decoded.put(data, None, None, template)
    return copy_config_record(template)


def _recorddict_from_proto(proto: ProtoRecordDict) -> RecordDict:
    """``flwr.common.serde.recorddict_from_proto``, config records through :func:`_config_from_proto`."""
    content = RecordDict()
    for item in proto.items:
        field = item.WhichOneof("value")
        if field == "array_record":
            content[item.key] = array_record_from_proto(item.array_record)
        elif field == "metric_record":
            content[item.key] = metric_record_from_proto(item.metric_record)
        elif field == "config_record":
            content[item.key] = _config_from_proto(item.config_record)
        else:
            raise ValueError(f"Unsupported record type: {field}")
    return content


def encode_message(message: Message, *, remember: bool = False) -> bytes:
    """Flower's bytes for ``message``. ``remember``: keep the protos of its array and config records for the next
    message that carries the same ones (a request of a broadcast; never a reply, whose records are its own)."""
    proto = ProtoMessage(
        metadata=metadata_to_proto(message.metadata),
        content=_recorddict_to_proto(message.content, remember) if message.has_content() else None,
        error=error_to_proto(message.error) if message.has_error() else None,
    )
    return bytes(proto.SerializeToString())


def decode_message(data: bytes | memoryview) -> Message:
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return make_message(
        metadata=metadata_from_proto(proto.metadata),
        content=_recorddict_from_proto(proto.content) if proto.HasField("content") else None,
        error=error_from_proto(proto.error) if proto.HasField("error") else None,
    )


def encode_context(context: Context) -> bytes:
    return bytes(context_to_proto(context).SerializeToString())


def decode_context(data: bytes | memoryview) -> Context:
    proto = ProtoContext()
    proto.ParseFromString(data)
    return context_from_proto(proto)
