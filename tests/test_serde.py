"""The local backend's serde (:mod:`fedshield.flower_internals.serde`) writes Flower's own bytes and decodes to what
Flower decodes, while converting a broadcast's records once: a record changed in place, or one that only compares
equal (``1 == 1.0 == True``), is converted again; a decoded config record is the caller's own."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, Metadata, MetricRecord, RecordDict
from flwr.app.message import make_message
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

from fedshield.flower_internals import records, serde

CONFIG = {"server-round": 3, "lr": 0.5, "dp": False, "task": "digits", "ids": [1, 2, 3], "blob": b"\x00\x01",
          "names": ["a", "b"], "flags": [True, False], "rates": [0.1, 0.2]}


def _flower_bytes(msg: Message) -> bytes:
    return bytes(message_to_proto(msg).SerializeToString())


def _flower_decoded(data: bytes) -> Message:
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


def _broadcast(arrays: ArrayRecord, config: ConfigRecord, node: int) -> Message:
    metadata = Metadata(run_id=5, message_id=f"m{node}", src_node_id=1, dst_node_id=node, reply_to_message_id="",
                        group_id="3", created_at=1.5, ttl=60.0, message_type="train")
    return make_message(metadata=metadata, content=RecordDict({"arrays": arrays, "config": config}))


def _arrays(seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord({"w": Array(rng.normal(size=(4, 3)).astype(np.float32)), "b": Array(np.arange(3.0))})


def _same(a: Message, b: Message) -> None:
    assert _flower_bytes(a) == _flower_bytes(b)
    assert a.metadata == b.metadata


def test_every_message_of_a_broadcast_is_flowers_bytes_and_decodes_as_flower_decodes() -> None:
    arrays, config = _arrays(0), ConfigRecord(dict(CONFIG))
    for node in (1, 2, 3):
        msg = _broadcast(arrays, config, node)
        data = serde.encode_message(msg, remember=True)
        assert data == _flower_bytes(msg)
        _same(serde.decode_message(data), _flower_decoded(data))
    reply = Message(RecordDict({"arrays": _arrays(1), "metrics": MetricRecord({"num-examples": 11.0})}),
                    reply_to=_broadcast(arrays, config, 1))
    assert serde.encode_message(reply) == _flower_bytes(reply)
    failed = Message(Error(code=3, reason="refused"), reply_to=_broadcast(arrays, config, 2))
    assert serde.encode_message(failed) == _flower_bytes(failed)
    assert serde.decode_message(serde.encode_message(failed)).error.reason == "refused"


@pytest.mark.parametrize("change", [
    lambda c, a: c.__setitem__("server-round", 4),                 # Flower's strategies write this each round
    lambda c, a: c.__setitem__("server-round", 3.0),                # equal value, another type
    lambda c, a: c.__setitem__("dp", 0),                            # False == 0
    lambda c, a: c.__setitem__("lr", -0.0),                         # 0.0 == -0.0 (sent as 0.0 first)
    lambda c, a: c.__setitem__("rates", [0.1, -0.0]),              # ... inside a list too
    lambda c, a: c.__setitem__("flags", [1, 0]),                    # [True, False] == [1, 0]
    lambda c, a: c.__setitem__("ids", [1, 2, 4]),
    lambda c, a: c["names"].append("c"),                            # a list changed in place
    lambda c, a: c.__delitem__("lr"),
    lambda c, a: a.__setitem__("w", Array(np.zeros((4, 3), dtype=np.float32))),   # an array replaced
    lambda c, a: setattr(a["b"], "data", Array(np.ones(3)).data),  # an array's bytes replaced
])
def test_a_record_changed_in_place_after_it_was_sent_is_encoded_anew(change) -> None:  # type: ignore[no-untyped-def]
    arrays, config = _arrays(2), ConfigRecord({**CONFIG, "names": list(CONFIG["names"])})  # type: ignore[dict-item]
    config["lr"], config["rates"] = 0.0, [0.1, 0.0]
    serde.encode_message(_broadcast(arrays, config, 1), remember=True)
    change(config, arrays)
    msg = _broadcast(arrays, config, 2)
    assert serde.encode_message(msg, remember=True) == _flower_bytes(msg)


@pytest.mark.parametrize("remember", [True, False])
def test_a_broadcasts_records_are_converted_once_and_a_replys_never_remembered(
        monkeypatch: pytest.MonkeyPatch, remember: bool) -> None:
    calls: list[str] = []
    for name in ("array_record_to_proto", "config_record_to_proto"):
        real = getattr(serde, name)
        monkeypatch.setattr(serde, name, lambda record, _real=real, _name=name: calls.append(_name) or _real(record))
    arrays, config = _arrays(4), ConfigRecord(dict(CONFIG))
    for node in (1, 2, 3):
        msg = _broadcast(arrays, config, node)
        assert serde.encode_message(msg, remember=remember) == _flower_bytes(msg)
    assert sorted(calls) == sorted(["array_record_to_proto", "config_record_to_proto"] * (1 if remember else 3))


def test_a_decoded_config_record_is_independent_of_the_next_decoding() -> None:
    data = serde.encode_message(_broadcast(_arrays(3), ConfigRecord(dict(CONFIG)), 1))
    first = serde.decode_message(data).content.config_records["config"]
    first["lr"] = 9.0
    first["ids"].append(4)
    second = serde.decode_message(data).content.config_records["config"]
    assert dict(second) == CONFIG and second == _flower_decoded(data).content.config_records["config"]
    with pytest.raises(TypeError):  # the copy still checks what is written into it
        second["bad"] = object()  # type: ignore[assignment]


def test_a_config_record_copy_has_exactly_the_state_flowers_constructor_gives() -> None:
    record = ConfigRecord(dict(CONFIG))
    copy = records.copy_config_record(record)
    assert set(copy.__dict__) == set(ConfigRecord(dict(CONFIG)).__dict__)
    assert copy == record and copy.object_id == record.object_id
    copy["names"].append("z")
    assert record["names"] == ["a", "b"]


def test_an_array_from_checked_fields_is_the_array_flowers_constructor_makes() -> None:
    flower = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    fast = records.array_from_fields(flower.dtype, tuple(flower.shape), flower.stype, flower.data)
    made = Array(dtype=flower.dtype, shape=tuple(flower.shape), stype=flower.stype, data=flower.data)
    assert fast.__dict__ == made.__dict__ and fast == made and fast.object_id == made.object_id
    assert np.array_equal(fast.numpy(), flower.numpy())
    fast.data = Array(np.ones(6, dtype=np.float32)).data  # Flower's dirty tracking still applies
    assert fast.is_dirty and fast.object_id != made.object_id
