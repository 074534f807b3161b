"""The outermost strategy layer: it notes what arrived in each round (sizes, aggregated metrics, evaluation).

It forwards everything to the wrapped strategy and only looks at the replies, writing what it sees into the run's
:class:`~fedshield.strategies.outcomes.RoundOutcomes`: each train reply's payload size (what travelled, SecAgg+'s
masked vectors included), the aggregated train metrics, and the federated evaluation. Who trained, failed or was
rejected is written there by the layer that knows (SecAgg+ or update validation, see ``RoundOutcomes``);
``last_replies`` reads it back.

Federated evaluation rides in the next round's train messages unless the run asks for it separately
(``fold_evaluation``): round r's train messages ask each client to evaluate the model they carry (the global model
after round r - 1) before training (``EVALUATE_RECEIVED``), and the figures come back in the train reply. Round r
then sends no evaluate message and reports the evaluation of round r - 1's model; the last round, whose model no
later message carries, sends its own evaluate messages as before, and so does a round whose train replies brought no
evaluation (a SecAgg+ round one site aborted, every trainer refused, clients too old to evaluate). The run folds
only when its trainers are the clients evaluation asks for (fixed sampling and ``fraction_evaluate`` equal to
``fraction_train``, the default 1 and 1: :func:`~fedshield.strategies.stack.build_strategy`). A plain deployed round
is then one message per site instead of two (each message costs its site a ClientApp process and several round trips
through the SuperLink); the price is that the model after the next-to-last round is not federated-evaluated.

Train replies pass through lazily, one at a time (:meth:`RecordingStrategy.aggregate_train`), so behind a
:class:`~fedshield.strategies.streaming.StreamingGrid` and a streaming inner strategy the server holds only the
reply being aggregated (and the rest of the batch its pull brought in). Evaluate replies carry metrics only; they
are listed, so an inner strategy may read them more than once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .. import protocol as P
from ..records_view import array_records, config_records, metric_records
from .clear_values import check_clear_metrics
from .outcomes import RoundOutcomes
from .wrapper import StrategyWrapper

__all__ = ["RecordingStrategy"]

_log = logging.getLogger(__name__)


class RecordingStrategy(StrategyWrapper):
    """Transparent wrapper that writes each round's sizes, metrics and evaluation into ``outcomes``.

    Args:
        inner: the wrapped strategy.
        outcomes: the run's shared round state (a new one if not given: then only this layer writes it).
        fold_evaluation: fold each round's federated evaluation into the next round's train messages (module
            docstring); rounds before ``last_round`` then send no evaluate message.
        last_round: the run's last round (global numbering), which evaluates its model with its own messages.
    """

    def __init__(self, inner: Strategy, outcomes: RoundOutcomes | None = None, *, fold_evaluation: bool = False,
                 last_round: int = 0) -> None:
        super().__init__(inner)
        self.outcomes = outcomes if outcomes is not None else RoundOutcomes()
        self.fold_evaluation, self.last_round = fold_evaluation, last_round
        self._received: tuple[MetricRecord | None, int] | None = None  # this round's folded evaluation, if asked

    def _folds(self, server_round: int) -> bool:
        """This round asks its trainers for the evaluation (before the last round, when folding)."""
        return self.fold_evaluation and server_round < self.last_round

    def _folded(self, server_round: int) -> bool:
        """This round's train replies brought an evaluation: no evaluate message. A round whose replies brought
        none (a SecAgg+ round aborted by one site, every trainer refused, clients too old to evaluate) sends its
        evaluate messages after all, of the model it ends with."""
        return self._folds(server_round) and self._received is not None and self._received[1] > 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._received = None
        if self._folds(server_round):
            config = ConfigRecord({**config, P.EVALUATE_RECEIVED: True})
        return self.inner.configure_train(server_round, arrays, config, grid)

    @property
    def last_replies(self) -> list[P.ClientReply]:
        """Per-client outcomes of the last train round, as the layer that judged them wrote them."""
        return self.outcomes.replies

    @property
    def last_bytes_up(self) -> list[int]:
        return self.outcomes.bytes_up

    @property
    def last_train_metrics(self) -> MetricRecord | None:
        return self.outcomes.train_metrics

    @property
    def last_evaluate(self) -> MetricRecord | None:
        return self.outcomes.evaluate

    @property
    def last_evaluated(self) -> int:
        return self.outcomes.evaluated

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Hand the replies on as they come (one pass, nothing kept but each reply's size)."""
        self.outcomes.bytes_up = []
        stream = self._record(replies)
        arrays, metrics = self.inner.aggregate_train(server_round, stream)
        for _ in stream:  # an inner strategy that stopped early: the rest still counts (and is pulled, then dropped)
            pass
        self.outcomes.train_metrics = metrics
        if self._folds(server_round):
            self._received = _received_evaluation(self.outcomes.replies)
        return arrays, metrics

    def _record(self, replies: Iterable[Message]) -> Iterator[Message]:
        """Yield each reply after noting its payload size; keeps none once the next is asked for."""
        for msg in replies:
            if not msg.has_error():
                self.outcomes.bytes_up.append(_payload_bytes(msg))
            yield msg
            del msg  # let go before the next reply is pulled

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.outcomes.evaluate, self.outcomes.evaluated, self.outcomes.evaluated_round = None, 0, None
        if self._folded(server_round):
            return []  # this round's train replies carried the evaluation (of the previous round's model)
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self._folded(server_round):
            for _ in replies:  # none were sent
                pass
            evaluate, evaluated = self._received if self._received is not None else (None, 0)
            self.outcomes.evaluate, self.outcomes.evaluated = evaluate, evaluated
            self.outcomes.evaluated_round = server_round - 1 if evaluated else None
            return evaluate
        # Metrics only, so a list costs little, and no inner strategy has to mind that a StreamingGrid's
        # iterator can be read only once.
        # A reply whose clear figures are out of range (NaN accuracy, a 1e12 count) is left out of the average.
        replies = [m for m in replies if m.has_error() or _clear_evaluate_ok(server_round, m)]
        self.outcomes.evaluated = sum(not m.has_error() for m in replies)
        self.outcomes.evaluate = self.inner.aggregate_evaluate(server_round, replies)
        self.outcomes.evaluated_round = server_round if self.outcomes.evaluated else None
        return self.outcomes.evaluate


def _received_evaluation(replies: Iterable[P.ClientReply]) -> tuple[MetricRecord | None, int]:
    """The federated evaluation the round's accepted train replies carried (``P.RECEIVED_*``), averaged the way
    Flower averages evaluate replies (weighted by each client's test-split size), and how many carried one.

    Only replies the round accepted count: their clear figures have passed the same range checks as an evaluate
    reply's (:mod:`.clear_values`), by update validation or, under SecAgg+, the masked reply's check."""
    keys = P.RECEIVED_KEYS
    figures = [[float(r.metrics[k]) for k in keys] for r in replies if r.ok and all(k in r.metrics for k in keys)
               and check_clear_metrics({k: r.metrics[k] for k in keys}) is None]
    total = sum(n for n, _, _ in figures)
    if not figures or total <= 0:
        return None, 0
    loss = sum(n * value for n, value, _ in figures) / total
    accuracy = sum(n * value for n, _, value in figures) / total
    return MetricRecord({P.EVAL_LOSS: loss, P.EVAL_ACCURACY: accuracy, P.NUM_EXAMPLES: total}), len(figures)


def _clear_evaluate_ok(server_round: int, msg: Message) -> bool:
    if len(metric_records(msg.content)) != 1:
        return True  # the inner strategy's own checks apply
    reason = check_clear_metrics(next(iter(metric_records(msg.content).values())))
    if reason is not None:
        _log.warning("round %d: left the evaluate reply of node %d out: %s", server_round,
                     msg.metadata.src_node_id, reason)
    return reason is None


def _payload_bytes(msg: Message) -> int:
    """Bytes of model data in a reply: its arrays, plus byte strings in config records (SecAgg+ masked vectors)."""
    total = sum(record.count_bytes() for record in array_records(msg.content).values())
    for record in config_records(msg.content).values():
        for value in record.values():
            if isinstance(value, bytes):
                total += len(value)
            elif isinstance(value, list):
                total += sum(len(v) for v in value if isinstance(v, bytes))
    return total

