"""Streaming aggregation: fold each reply into a running weighted sum as it arrives, then drop it.

Flower's ``aggregate_arrayrecords`` takes the list of all N replies and normalises the weights first, so every
reply must be held until the sum starts: O(N x model) memory on the server. :class:`StreamingFedAvg` computes the
same weighted average as a running sum ``sum_i w_i x_i`` (float64) divided by ``sum_i w_i`` at the end, touching one
reply at a time, so it consumes any iterable of replies lazily.

Within Flower 1.39's Strategy API, true streaming is possible: ``Strategy.start`` hands ``grid.send_and_receive``'s
return value straight to ``aggregate_train`` as an ``Iterable[Message]`` and keeps nothing else of it. The stock
grids return a list (they pull until every reply is in), so :class:`StreamingGrid` wraps a grid and returns a lazy
iterator instead: it pushes the messages, then pulls and yields replies as they arrive. With both, the server holds
the reply being folded, the rest of the batch that one pull brought in, and nothing else (in deployment the replies
not yet pulled wait in the SuperLink's process; in simulation the SuperLink shares the server's process). Every
wrapper between ``start`` and the aggregation must stay lazy too (a single ``list(replies)`` on the way brings back
O(N x model)), and the iterator can be consumed only once: a wrapper that needs two passes must make its own list.
Every strategy fedshield builds reads train replies once (Flower 1.39's FedAvg family, the robust ones included,
lists them in ``_check_and_log_replies`` first); Flower's ``DifferentialPrivacy*AdaptiveClipping`` wrappers do not
(``validate_replies`` iterates, then ``list`` finds nothing left) and would need a list in front of them.

A strategy whose ``aggregate_train`` reads the replies once, in order, and drops each one's arrays before taking the
next says so with a true class attribute ``streams_replies``; :func:`~fedshield.strategies.stack.build_strategy`
reads it from the strategies it builds and tells the wrappers above (``streams=True``), so
:class:`~fedshield.strategies.validation.UpdateValidation` screens such a strategy's replies in a single pass too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from logging import INFO, WARNING
from typing import Any, ClassVar, cast

import numpy as np
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from numpy.typing import NDArray

from ..flower_internals.serverapp import InconsistentMessageReplies, log
from ..arrays import array_record, from_numpy, to_numpy
from ..errors import ProtocolError
from ..protocol import HELD_PULL_S, MALFORMED_REPLY_CODE, REJECTED
from ..records_view import array_records, metric_records
from ..wire import pack_content, unpack_content

__all__ = ["WeightedSum", "StreamingFedAvg", "StreamingGrid"]


class WeightedSum:
    """Running ``sum_i w_i x_i`` over ArrayRecords with the same keys, and ``sum_i w_i``; one record at a time.

    Products and sums are float64 whatever the inputs (a 1000-client float32 sum keeps its precision, and a single
    reply comes back bit-exact); :meth:`average` returns each array in the dtype Flower's FedAvg would give it
    (``x * 0.5``'s dtype: float32 stays float32, integers become float64).
    """

    def __init__(self) -> None:
        self._sums: dict[str, NDArray[np.float64]] = {}
        self._dtypes: dict[str, np.dtype[Any]] = {}
        # One float64 buffer, as large as the largest array, reused for every product: allocating (and page-
        # faulting) a fresh temporary per array per reply doubled the time of a 10M-parameter fold.
        self._scratch = np.empty(0, dtype=np.float64)
        self.total_weight = 0.0
        self.count = 0

    def add(self, arrays: ArrayRecord, weight: float) -> None:
        for key, array in arrays.items():
            value = to_numpy(array, copy=False)  # a read-only view of the reply's bytes, dropped after this iteration
            if key not in self._sums:
                self._sums[key] = np.asarray(np.multiply(value, weight, dtype=np.float64))  # 0-d stays an array
                self._dtypes[key] = np.result_type(value.dtype, 0.5)
                continue
            if self._scratch.size < value.size:
                self._scratch = np.empty(value.size, dtype=np.float64)
            product = self._scratch[: value.size].reshape(value.shape)
            np.multiply(value, weight, out=product, dtype=np.float64)
            np.add(self._sums[key], product, out=self._sums[key])
        self.total_weight += weight
        self.count += 1

    def average(self) -> ArrayRecord:
        """The weighted average as a new ArrayRecord (keys in first-seen order)."""
        if self.total_weight == 0:
            raise ZeroDivisionError("total weight is 0: every reply had weight 0")
        out = {}
        for key, total in self._sums.items():
            out[key] = from_numpy(np.asarray(np.divide(total, self.total_weight), dtype=self._dtypes[key]))
        return array_record(out)


class StreamingFedAvg(FedAvg):
    """Flower's FedAvg, with an ``aggregate_train`` that folds replies one by one (see the module docstring).

    Same constructor, sampling, evaluation and checks as :class:`flwr.serverapp.strategy.FedAvg`: replies must each
    carry one ArrayRecord and one MetricRecord with the same keys as the first reply and the weight key, else
    :class:`~flwr.serverapp.exception.InconsistentMessageReplies` is raised, as Flower does. The train metrics go
    through the same ``train_metrics_aggr_fn``, fed only the replies' MetricRecords.
    """

    streams_replies: ClassVar[bool] = True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        fold = WeightedSum()
        metric_contents: list[RecordDict] = []
        reference: tuple[set[str], set[str]] | None = None
        failures = 0
        for msg in replies:
            if msg.has_error():
                failures += 1
                log(INFO, "\t> Received error in reply from node %d: %s", msg.metadata.src_node_id, msg.error.reason)
                continue
            arrays, metrics = _checked_records(msg.content, self.weighted_by_key)
            keys = (set(arrays.keys()), set(metrics.keys()))
            reference = reference or keys
            _check_same_keys(reference, keys)
            fold.add(arrays, float(cast(float, metrics[self.weighted_by_key])))
            metric_contents.append(RecordDict({k: v for k, v in metric_records(msg.content).items()}))
            del msg, arrays  # let go of this reply before the next one is pulled: between two, the fold holds none
        log(INFO, "aggregate_train: Received %s results and %s failures", fold.count, failures)
        if fold.count == 0:
            return None, None
        if fold.total_weight == 0:
            log(WARNING, "aggregate_train: every reply has %s = 0; global model unchanged", self.weighted_by_key)
            return None, None
        return fold.average(), self.train_metrics_aggr_fn(metric_contents, self.weighted_by_key)


def _checked_records(content: RecordDict, weight_key: str) -> tuple[ArrayRecord, MetricRecord]:
    """The reply's only ArrayRecord and MetricRecord, with the checks of Flower's
    ``validate_message_reply_consistency``, applied to one reply."""
    if len(array_records(content)) != 1:
        raise InconsistentMessageReplies(reason="Expected exactly one ArrayRecord in replies. Skipping aggregation.")
    if len(metric_records(content)) != 1:
        raise InconsistentMessageReplies(
            reason="Expected exactly one MetricRecord in replies, but found more. Skipping aggregation."
        )
    metrics = next(iter(metric_records(content).values()))
    if weight_key not in metrics:
        raise InconsistentMessageReplies(
            reason=f"Missing required key `{weight_key}` in the MetricRecord of reply messages. Cannot average "
            "ArrayRecords and MetricRecords. Skipping aggregation."
        )
    if isinstance(metrics[weight_key], list):
        raise InconsistentMessageReplies(
            reason=f"Key `{weight_key}` in the MetricRecord of reply messages must be a single value (int or "
            "float), but a list was found. Skipping aggregation."
        )
    return next(iter(array_records(content).values())), metrics


def _check_same_keys(reference: tuple[set[str], set[str]], keys: tuple[set[str], set[str]]) -> None:
    if keys[0] != reference[0]:
        raise InconsistentMessageReplies(
            reason="All ArrayRecords must have the same keys for aggregation. This condition wasn't met. "
            "Skipping aggregation."
        )
    if keys[1] != reference[1]:
        raise InconsistentMessageReplies(
            reason="All MetricRecords must have the same keys for aggregation. This condition wasn't met. "
            "Skipping aggregation."
        )


class StreamingGrid(Grid):
    """A Grid whose ``send_and_receive`` yields replies as they arrive instead of returning them all at the end.

    Everything else is forwarded to the wrapped grid. The messages are pushed at once (so clients start working
    immediately, and the ``timeout`` runs from then); replies are pulled only while the caller iterates, every
    ``pull_interval`` seconds, until all have arrived or ``timeout`` passes; for ``quick_window`` seconds after the
    push and after each arrival, every ``quick_interval`` seconds instead (the next reply of a short stage, such as
    SecAgg+'s UNMASK, is likely then; a long training stage soon falls back to ``pull_interval``, so a pull costs at
    most ``quick_window / quick_interval`` extra requests per push or arrival). Against fedshield's SuperLink, which
    holds a pull that finds no reply until one is stored (:mod:`fedshield.flower_internals.held_pulls`), it pulls
    again at once after a held pull or an arrival, and these intervals apply only to pulls answered at once (Flower's
    own SuperLink). A caller that stops iterating early
    leaves the rest unpulled. The returned iterator can be consumed once: a caller that needs the replies twice
    (``len``, a second loop) must make a list of them itself.
    """

    def __init__(self, grid: Grid, *, pull_interval: float = 0.1, quick_interval: float | None = None,
                 quick_window: float = 0.0) -> None:
        quick_interval = pull_interval if quick_interval is None else quick_interval
        for name, value in (("pull_interval", pull_interval), ("quick_interval", quick_interval),
                            ("quick_window", quick_window)):
            if not (value >= 0 and value < float("inf")):
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        self._grid = grid
        self.pull_interval, self.quick_interval, self.quick_window = pull_interval, quick_interval, quick_window

    def set_run(self, run_id: Any) -> None:
        self._grid.set_run(run_id)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(_packed(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [_unpacked(m) for m in self._grid.pull_messages(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        packed = _packed(messages)
        if not packed:  # a stage with nothing to send (federated evaluation folded into the next train message)
            return iter(())
        pending = {mid for mid in self._grid.push_messages(packed) if mid}
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._pull(pending, deadline)

    def _pull(self, pending: set[str], deadline: float | None) -> Iterator[Message]:
        quick_until = time.monotonic() + self.quick_window
        while pending and (deadline is None or time.monotonic() < deadline):
            asked = time.monotonic()
            arrived = [_unpacked(m) for m in self._grid.pull_messages(set(pending))]
            held = time.monotonic() - asked >= HELD_PULL_S  # about the SuperLink's hold: it waited for a reply
            pending.difference_update(m.metadata.reply_to_message_id for m in arrived)
            if arrived:
                quick_until = time.monotonic() + self.quick_window
            arrived_any = bool(arrived)
            arrived.reverse()  # pop() from the end hands them out in arrival order, in O(1) each
            while arrived:
                yield arrived.pop()  # the caller's fold is now the only holder of this reply
            if not pending:
                break
            wait = self.quick_interval if time.monotonic() < quick_until else self.pull_interval
            if hasattr(self._grid, "wait_for_replies"):  # simulation's grid wakes when a reply arrives
                self._grid.wait_for_replies(wait)
            elif not (held or arrived_any):  # a SuperLink that holds empty pulls already waited for the next reply
                time.sleep(wait)


def _packed(messages: Iterable[Message]) -> list[Message]:
    """``messages`` with their arrays packed into one object each (:mod:`fedshield.wire`): one request per hop
    instead of two per tensor. Messages that share one model record (a broadcast) share one packed copy."""
    out: list[Message] = list(messages)
    cache: dict[int, tuple[ArrayRecord, ArrayRecord]] = {}
    for msg in out:
        if msg.has_content():
            msg.content = pack_content(msg.content, cache)
    return out


def _unpacked(msg: Message) -> Message:
    """``msg`` with its arrays unpacked; a reply whose packed array is malformed becomes an error reply from its
    node (recorded as rejected), never an exception in the server's round."""
    if not msg.has_content():
        return msg
    try:
        content, packed = unpack_content(msg.content)
    except ProtocolError as error:
        log(WARNING, "rejected the reply of node %d: %s", msg.metadata.src_node_id, error)
        return Message(Error(MALFORMED_REPLY_CODE, f"{REJECTED}: {error}"), metadata=msg.metadata)
    if packed:
        msg.content = content
    return msg
