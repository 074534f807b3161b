"""Flower's own protobuf serialization of a ``Message`` and a ``Context`` (``flwr.common.serde``, ``flwr.proto``).

Why: the local simulation backend (:mod:`fedshield.simulation.local_pool`) hands each ClientApp call to a worker
process; Flower's wire format carries exactly what its SuperLink/SuperNode carry, so nothing is pickled.
"""

from __future__ import annotations

from flwr.common import Context as Context
from flwr.common import Message as Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext  # pylint: disable=no-name-in-module
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

__all__ = ["Context", "Message", "encode_message", "decode_message", "encode_context", "decode_context"]


def encode_message(message: Message) -> bytes:
    return bytes(message_to_proto(message).SerializeToString())


def decode_message(data: bytes) -> Message:
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


def encode_context(context: Context) -> bytes:
    return bytes(context_to_proto(context).SerializeToString())


def decode_context(data: bytes) -> Context:
    proto = ProtoContext()
    proto.ParseFromString(data)
    return context_from_proto(proto)
