"""Packed messages (fedshield.wire): one object per model on the wire, the same arrays after unpacking, a strict
reader on both sides, and the server's grid and the ClientApp's mod packing and unpacking in pairs."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedshield.client.app import packed_wire
from fedshield.errors import ProtocolError
from fedshield.protocol import ARRAYS, CONFIG_ERROR_CODE, MALFORMED_REPLY_CODE, METRICS, REJECTED
from fedshield.strategies.streaming import StreamingGrid
from fedshield.tasks import get_task
from fedshield.wire import PACKED_KEY, PACKED_STYPE, pack_content, pack_record, unpack_content, unpack_record


def _mixed() -> ArrayRecord:
    """Every kind of tensor a model's state holds (float32/64, int64 counters, 0-d, empty); the same every call."""
    g = torch.Generator().manual_seed(0)
    return ArrayRecord(torch_state_dict={
        "conv.weight": torch.randn(4, 1, 3, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
        "bn.num_batches_tracked": torch.tensor(7), "fc.weight": torch.randn(3, 5, dtype=torch.float64, generator=g),
        "empty": torch.zeros(0, 2), "scalar": torch.tensor(1.5),
    })


def _same(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a) == list(b)
    for key in a:
        assert (a[key].dtype, a[key].shape, a[key].stype, a[key].data) == (b[key].dtype, b[key].shape, b[key].stype,
                                                                             b[key].data), key


def test_round_trip_gives_back_the_same_arrays_in_order() -> None:
    record = _mixed()
    packed = pack_record(record)
    assert list(packed) == [PACKED_KEY] and packed[PACKED_KEY].stype == PACKED_STYPE
    back = unpack_record(packed)
    _same(back, record)
    assert back.object_id == record.object_id  # Flower's content hash: nothing above can tell
    for key, value in back.to_torch_state_dict().items():
        assert torch.equal(value, record.to_torch_state_dict()[key])


def test_records_without_anything_to_save_pass_unchanged() -> None:
    one = ArrayRecord({"w": Array(np.ones(3))})
    assert pack_record(one) is one and unpack_record(one) is one
    assert unpack_record(_mixed()) is not None and list(unpack_record(_mixed())) == list(_mixed())


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("tensors", [6, 60])
def test_a_message_is_six_objects_whatever_the_number_of_tensors(tensors: int) -> None:
    """Why packing exists: Flower moves a message as one request per object on every hop; unpacked, an
    ArrayRecord is 1 + 2 objects per tensor (the Array and its chunk)."""
    if tensors == 6:
        state = get_task("digits").new_model(0).state_dict()
        assert len(state) == 6
    else:
        state = {f"layer{i}.weight": torch.randn(8, 8) for i in range(tensors)}
    content = RecordDict({ARRAYS: ArrayRecord(torch_state_dict=state), "config": ConfigRecord({"lr": 0.1})})
    plain = len(get_all_nested_objects(Message(content, dst_node_id=1, message_type="train")))
    packed = len(get_all_nested_objects(Message(pack_content(content), dst_node_id=1, message_type="train")))
    assert plain == 2 * tensors + 4 and packed == 6


def test_a_model_larger_than_a_chunk_still_round_trips() -> None:
    record = ArrayRecord({"a": Array(np.arange(1_000_000, dtype=np.float64)), "b": Array(np.ones((3, 7)))})
    packed = pack_record(record)
    assert len(packed[PACKED_KEY].children) == 2  # 8 MB: two of Flower's 5 MB chunks
    _same(unpack_record(packed), record)


def _raw(table: Any, payload: bytes = b"", *, length: int | None = None) -> ArrayRecord:
    head = table if isinstance(table, bytes) else json.dumps(table).encode()
    data = struct.pack("<Q", len(head) if length is None else length) + head + payload
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(data),), stype=PACKED_STYPE, data=data)})


def _good_entry(size: int = 4) -> list[Any]:
    return ["w", "float32", [1], "numpy.ndarray", size]


@pytest.mark.parametrize(("record", "says"), [
    (ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(3,), stype="numpy.ndarray", data=b"abc")}),
     "serialisation type"),
    (ArrayRecord({PACKED_KEY: Array(np.ones(2)), "other": Array(np.ones(2))}), "holds only"),
    (ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(3,), stype=PACKED_STYPE, data=b"abc")}), "too short"),
    (_raw([_good_entry()], b"1234", length=1 << 40), "announces"),
    (_raw(b"{not json", b""), "not JSON"),
    (_raw({"w": 1}), "must list"),
    (_raw([["w", "float32", [-1], "numpy.ndarray", 4]], b"1234"), "must list"),
    (_raw([["w", "float32", [1], "numpy.ndarray", True]], b"1"), "must list"),
    (_raw([["w", "float32", [1], "numpy.ndarray"]], b"1234"), "must list"),
    (_raw([_good_entry(8)], b"1234"), "claims more bytes"),
    (_raw([_good_entry(), _good_entry()], b"12345678"), "twice"),
    (_raw([_good_entry(2)], b"1234"), "does not account for"),
])
def test_a_malformed_packed_record_is_refused_with_the_reason(record: ArrayRecord, says: str) -> None:
    with pytest.raises(ProtocolError, match=says):
        unpack_record(record)


# --- the two ends: server grid and ClientApp mod ------------------------------------------------------------------


class _ClientSide:
    """A grid stand-in whose nodes run the ClientApp's ``packed_wire`` mod around a handler that checks what it
    got and answers with a model; ``tamper`` corrupts a node's packed reply on the way back."""

    def __init__(self, tamper: int | None = None) -> None:
        self.pushed: list[Message] = []
        self.tamper = tamper

    def push_messages(self, messages: Any) -> list[str]:
        self.pushed = list(messages)
        for i, msg in enumerate(self.pushed):
            msg.metadata.__dict__["_message_id"] = f"m{i}"
        return [m.metadata.message_id for m in self.pushed]

    def pull_messages(self, ids: Any) -> list[Message]:
        replies = [packed_wire(m, Context(1, 1, {}, {}, RecordDict()), self._handler) for m in self.pushed]
        if self.tamper is not None:
            bad = replies[self.tamper].content[ARRAYS][PACKED_KEY]
            replies[self.tamper].content[ARRAYS] = _raw([_good_entry(10 ** 6)], bad.data[:10])
        return replies

    @staticmethod
    def _handler(msg: Message, _ctx: Context) -> Message:
        arrays = msg.content[ARRAYS]
        assert PACKED_KEY not in arrays and list(arrays) == list(_mixed())  # the handler sees the model's own keys
        doubled = ArrayRecord({k: Array(np.asarray(a.numpy() * 2)) for k, a in arrays.items()})
        return Message(RecordDict({ARRAYS: doubled, METRICS: MetricRecord({"n": 1.0})}), reply_to=msg)


def _broadcast(n: int) -> list[Message]:
    content = RecordDict({ARRAYS: _mixed(), "config": ConfigRecord({"lr": 0.1})})
    return [Message(content, dst_node_id=10 + i, message_type="train") for i in range(n)]


@pytest.mark.usefixtures("task_identity")
def test_grid_and_mod_pack_both_ways_and_the_server_sees_plain_replies() -> None:
    inner = _ClientSide()
    stream = StreamingGrid(inner, pull_interval=0.0).send_and_receive(_broadcast(3), timeout=5)  # type: ignore[arg-type]
    assert all(list(m.content[ARRAYS]) == [PACKED_KEY] for m in inner.pushed)  # what left the server
    assert len({id(m.content[ARRAYS]) for m in inner.pushed}) == 1  # one shared model packed once
    replies = list(stream)
    assert len(replies) == 3
    for reply in replies:
        assert list(reply.content[ARRAYS]) == list(_mixed())
        np.testing.assert_array_equal(reply.content[ARRAYS]["conv.bias"].numpy(), _mixed()["conv.bias"].numpy() * 2)


@pytest.mark.usefixtures("task_identity")
def test_a_malformed_reply_is_that_nodes_rejection_not_the_servers_crash() -> None:
    replies = list(StreamingGrid(_ClientSide(tamper=1), pull_interval=0.0).send_and_receive(_broadcast(3), timeout=5))  # type: ignore[arg-type]
    errors = [m for m in replies if m.has_error()]
    assert len(replies) == 3 and len(errors) == 1
    assert errors[0].error.code == MALFORMED_REPLY_CODE and errors[0].error.reason.startswith(f"{REJECTED}: ")
    assert "claims more bytes" in errors[0].error.reason


@pytest.mark.usefixtures("task_identity")
def test_mod_passes_an_unpacked_message_through_and_refuses_a_malformed_one() -> None:
    ctx = Context(1, 1, {}, {}, RecordDict())
    plain = _broadcast(1)[0]
    seen: list[Message] = []

    def handler(msg: Message, _ctx: Context) -> Message:
        seen.append(msg)
        return Message(RecordDict({ARRAYS: _mixed()}), reply_to=msg)

    reply = packed_wire(plain, ctx, handler)
    assert seen == [plain] and list(reply.content[ARRAYS]) == list(_mixed())  # unpacked in, unpacked out
    bad = Message(RecordDict({ARRAYS: _raw(b"[", b"")}), dst_node_id=1, message_type="train")
    refused = packed_wire(bad, ctx, handler)
    assert len(seen) == 1 and refused.has_error() and refused.error.code == CONFIG_ERROR_CODE
    assert "not JSON" in refused.error.reason


@pytest.mark.usefixtures("task_identity")
def test_content_other_than_arrays_is_kept_as_it_was() -> None:
    content = RecordDict({ARRAYS: _mixed(), "config": ConfigRecord({"a": 1}), METRICS: MetricRecord({"x": 2.0}),
                          "single": ArrayRecord({"only": Array(np.ones(1))})})
    packed = pack_content(content)
    assert packed["config"] is content["config"] and packed["single"] is content["single"]
    back, was_packed = unpack_content(packed)
    assert was_packed and list(back) == list(content) and back.object_id == content.object_id
    assert unpack_content(content) == (content, False)


@pytest.mark.usefixtures("task_identity")
def test_error_replies_pass_the_grid_unchanged() -> None:
    class Failing(_ClientSide):
        def pull_messages(self, ids: Any) -> list[Message]:
            return [Message(Error(code=7, reason="site crashed"), reply_to=m) for m in self.pushed]

    replies = list(StreamingGrid(Failing(), pull_interval=0.0).send_and_receive(_broadcast(2), timeout=5))  # type: ignore[arg-type]
    assert [(m.error.code, m.error.reason) for m in replies] == [(7, "site crashed")] * 2
