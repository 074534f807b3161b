"""Server side of compressed updates: turn each quantized reply back into full weights before aggregation, so
any strategy (FedAvg, FedAdam, robust ones) aggregates what it always does."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .. import protocol as P
from ..arrays import record_to_numpy
from ..compression import dequantize_update, is_quantized
from ..records_view import array_records, metric_records
from .wrapper import StrategyWrapper

__all__ = ["DequantizeUpdates"]


class DequantizeUpdates(StrategyWrapper):
    """Wrap ``inner``; replies carrying a quantized update become ``global + dequantized update``.

    Args:
        inner: the wrapped strategy.
        streams: True when ``inner`` reads the replies once, in order, keeping none: restoring is one reply at a
            time, so this wrapper then streams too.
    """

    def __init__(self, inner: Strategy, *, streams: bool = False) -> None:
        super().__init__(inner)
        self._streams = streams
        self._global: dict | None = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = record_to_numpy(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    @property
    def streams_replies(self) -> bool:
        return self._streams

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, (self._restore(m) for m in replies))

    def _restore(self, msg: Message) -> Message:
        """The reply with its quantized update replaced by full weights; its metadata (the client's node id, which
        every verdict and privacy charge is keyed by) is the reply's own. The reply itself is not modified."""
        if msg.has_error() or self._global is None or P.ARRAYS not in array_records(msg.content):
            return msg
        packed = record_to_numpy(msg.content[P.ARRAYS])
        if not is_quantized(packed):
            return msg
        update = dequantize_update(packed, self._global)
        weights = {
            k: (ref + update[k]).astype(ref.dtype) if ref.dtype.kind == "f" else update[k]
            for k, ref in self._global.items()
        }
        content = RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in weights.items()})})
        for name, record in metric_records(msg.content).items():
            content[name] = record
        restored = copy.copy(msg)  # shares the metadata: same source node, same reply-to id
        restored.content = content
        return restored
