"""Check every client update before it reaches aggregation; a bad one is rejected with a reason, never averaged.

One client must not be able to break a round for everybody: a NaN, an array of the wrong shape, a huge update or
a malformed reply is dropped here, reported in ``last_replies`` as an error ``fedshield:rejected: <reason>`` (the
run report counts it in ``clients_rejected`` and lists the reason), and the round goes on with the other clients.

Checks, in order: one ArrayRecord and one MetricRecord; the weight key present; every clear metric finite and in
range (:func:`~fedshield.strategies.clear_values.check_clear_metrics`: NaN, infinity, a negative count or epsilon
drop the reply, never the round or the report); the metric keys the round expects (Flower's strategies raise for the whole round unless every reply has the same ones; see
:meth:`UpdateValidation.aggregate_train` for which set is expected); the same array keys, shapes and dtypes as the
global model sent this round; every value finite; the L2 norm of the update ``w_client - w_global`` within
``max_update_norm`` (if set).

Weights are bounded: an accepted reply whose weight exceeds ``max_weight`` aggregates at ``max_weight`` (its
MetricRecord's weight is lowered in place, the one change made to a reply), so a site that claims 1e12 examples
weighs no more than an honest site at the agreed maximum; the cap and the claim are logged.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .. import protocol as P
from ..arrays import to_numpy
from ..errors import ConfigError
from ..protocol import REJECTED
from ..records_view import array_records, metric_records
from .clear_values import DEFAULT_MAX_WEIGHT, check_clear_metrics, drop_bad_received, usable_metrics
from .outcomes import RoundOutcomes
from .wrapper import StrategyWrapper

__all__ = ["REJECTED", "UpdateValidation", "check_reply"]

_log = logging.getLogger(__name__)



class UpdateValidation(StrategyWrapper):
    """Wrapper that screens train replies for ``inner``; everything else is forwarded unchanged.

    Args:
        inner: the strategy that aggregates the accepted replies.
        max_update_norm: bound on the L2 norm of ``w_client - w_global`` (None: no bound).
        weight_key: the metric the inner strategy weights by (Flower's ``weighted_by_key``).
        max_weight: the largest weight one reply aggregates at (None: no cap).
        streams: True when the inner strategy reads the replies once, in order, keeping none
            (``StreamingFedAvg``, client-level DP): then this wrapper screens them in one pass too.
        outcomes: the run's shared round state, where the verdicts go (a new one if not given).
        aggregated_replies: True under SecAgg+: the one reply a round is the sum of several clients, whose
            outcomes SecAgg+ writes; a rejection of that sum is written as a rejection of each included client.

    After ``aggregate_train``, ``last_replies`` (``outcomes.replies``) holds one
    :class:`~fedshield.protocol.ClientReply` per node asked or answering, sorted by node id. Replies are never
    modified (but for a weight above ``max_weight``); the accepted ones are handed on as they are.
    """

    def __init__(
        self, inner: Strategy, *, max_update_norm: float | None = None, weight_key: str | None = None,
        max_weight: float | None = DEFAULT_MAX_WEIGHT, streams: bool = False, outcomes: RoundOutcomes | None = None,
        aggregated_replies: bool = False,
    ) -> None:
        if max_update_norm is not None and not (max_update_norm > 0 and math.isfinite(max_update_norm)):
            raise ConfigError(f"max_update_norm must be a finite number > 0, got {max_update_norm}")
        if max_weight is not None and not (max_weight > 0 and math.isfinite(max_weight)):
            raise ConfigError(f"max_weight must be a finite number > 0, got {max_weight}")
        super().__init__(inner)
        self.max_update_norm = max_update_norm
        self.max_weight = max_weight
        self.weight_key = weight_key or P.NUM_EXAMPLES
        self.outcomes = outcomes if outcomes is not None else RoundOutcomes()
        self.aggregated_replies = aggregated_replies
        self._streams = streams
        self._global: ArrayRecord | None = None
        self._asked: list[int] = []
        #: The metric keys most well-formed replies carried in the last round, if at least two did; else None.
        self._expected_keys: frozenset[str] | None = None

    def summary(self) -> None:
        _log.info("update validation: max_update_norm=%s, max_weight=%s", self.max_update_norm, self.max_weight)
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._global = arrays
        self._asked = [m.metadata.dst_node_id for m in messages]
        return messages

    @property
    def streams_replies(self) -> bool:
        """True when the inner strategy streams: then this wrapper screens in one pass too."""
        return self._streams

    @property
    def last_replies(self) -> list[P.ClientReply]:
        return self.outcomes.replies

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Screen the replies and hand the acceptable ones, unmodified, to the inner strategy.

        Which metric keys a reply must carry: the inner strategy compares every reply with the first one it gets
        and raises for the whole round on a difference, so one set must be chosen here, before the inner strategy
        sees any reply. The server cannot know it in advance (it depends on the clients' settings and sites:
        ``partition-id`` only in simulation, ledger figures only under DP-SGD), so it is learnt from the replies:

        * Inner strategy that streams (``streams_replies``: ``fedavg``, client-level DP): replies are screened one
          by one as they arrive and none is held back, so there is one pass. The expected keys are those most
          well-formed replies carried in the previous round, if at least two did (an honest client's keys do not
          change within a run). Otherwise (the first round, the first after a resume, or under SecAgg+, where
          this wrapper sees one aggregated reply a round) they are the keys of the first reply that passes every
          other check: exactly the reply the inner strategy will compare the others with. So a client that
          answers first with keys of its own gets the others rejected for one round at most, each rejection
          reported with its reason. A run whose clients legitimately send different key sets (mixed fedshield
          versions) loses the replies of the set that was in the minority the round before.
        * Any other inner strategy (Flower's, the Byzantine-robust ones included) builds a list of all replies
          itself, so they are listed here too (references to the same messages: no extra memory) and the expected
          keys are those most well-formed replies carry: one client can never get the honest majority rejected
          and so defeat a robust aggregator.

        Ties go to the larger key set, then by name.
        """
        verdicts: dict[int, P.ClientReply] = {}
        seen: Counter[frozenset[str]] = Counter()
        if self.streams_replies:
            expected, source = self._expected_keys, "what most replies carried last round"
        else:
            replies = list(replies)
            expected = _majority(Counter(k for k in map(_metric_keys, replies) if k is not None))
            source = "what most replies carry"
        accepted = self._screen(server_round, replies, expected, source, verdicts, seen)
        try:
            result = self.inner.aggregate_train(server_round, accepted)
        finally:
            for _ in accepted:  # finish screening if the inner strategy stopped early: every reply gets a verdict
                pass
            self._settle(verdicts)
            self._expected_keys = _majority(seen, at_least=2)
        return result

    def _settle(self, verdicts: dict[int, P.ClientReply]) -> None:
        """Write the round's verdicts: per client, or under SecAgg+ the verdict on the clients' sum."""
        if self.aggregated_replies:
            reasons = [v.error for v in verdicts.values() if v.error is not None]
            if reasons:
                self.outcomes.reject_included(f"{reasons[0]} (the SecAgg+ sum of the round's updates)")
            return
        for node in self._asked:
            verdicts.setdefault(node, P.ClientReply(node, error="no reply before the round timed out"))
        self.outcomes.settle(verdicts.values())

    def _screen(
        self, server_round: int, replies: Iterable[Message], expected: frozenset[str] | None, source: str,
        verdicts: dict[int, P.ClientReply], seen: Counter[frozenset[str]],
    ) -> Iterator[Message]:
        """Yield the acceptable replies one by one, recording every verdict and every well-formed reply's metric
        keys in ``seen``; with ``expected`` None, the first accepted reply's keys become the expected ones."""
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                verdicts[node] = P.ClientReply(node, error=str(msg.error.reason))
                continue
            if len(metric_records(msg.content)) == 1:
                bad = drop_bad_received(next(iter(metric_records(msg.content).values())))
                if bad is not None:  # the update is judged on its own; only the evaluation is left out
                    _log.warning("round %d: left node %d's folded evaluation out: %s", server_round, node, bad)
            keys = _metric_keys(msg)
            if keys is not None:
                seen[keys] += 1
            reason = check_reply(msg, self._global, weight_key=self.weight_key, max_update_norm=self.max_update_norm,
                                 metric_keys=expected, metric_keys_source=source)
            if reason is not None:
                _log.warning("round %d: rejected the update of node %d: %s", server_round, node, reason)
                verdicts[node] = P.ClientReply(node, _numeric_metrics(msg), error=f"{REJECTED}: {reason}")
                del msg  # not kept alive while the next reply is pulled
                continue
            if expected is None:
                expected, source = keys, f"what the round's first accepted reply, from node {node}, carried"
            verdicts[node] = P.ClientReply(node, _numeric_metrics(msg))
            _drop_received(msg)
            if not self.aggregated_replies:  # SecAgg+ bounded each weight in the sum already
                self._cap_weight(server_round, node, msg)
            yield msg
            del msg

    def _cap_weight(self, server_round: int, node: int, msg: Message) -> None:
        """Lower a weight above ``max_weight`` to it, so one site's claimed count cannot outweigh the others."""
        metrics = next(iter(metric_records(msg.content).values()))
        weight = float(metrics[self.weight_key])  # type: ignore[arg-type]  # check_reply made it a number
        if self.max_weight is not None and weight > self.max_weight:
            _log.warning("round %d: node %d claims weight %g; it aggregates at max-weight %g",
                         server_round, node, weight, self.max_weight)
            metrics[self.weight_key] = self.max_weight


def check_reply(
    msg: Message,
    global_arrays: ArrayRecord | None,
    *,
    weight_key: str = P.NUM_EXAMPLES,
    max_update_norm: float | None = None,
    metric_keys: frozenset[str] | None = None,
    metric_keys_source: str = "what the other replies carry",
) -> str | None:
    """Why this train reply must not be aggregated, or None if it may be. Never modifies the reply.

    ``metric_keys``: the exact metric key set the reply must carry (None: any); ``metric_keys_source`` says where
    that set came from, for the reason."""
    content = msg.content
    if len(array_records(content)) != 1 or len(metric_records(content)) != 1:
        return (f"expected one ArrayRecord and one MetricRecord, got ArrayRecords {list(array_records(content))} "
                f"and MetricRecords {list(metric_records(content))}")
    metrics = next(iter(metric_records(content).values()))
    reason = _check_weight(metrics, weight_key) or check_clear_metrics(metrics, weight_key=weight_key)
    if reason is None and metric_keys is not None and _training_keys(metrics) != metric_keys:
        reason = (f"its metric keys {sorted(metrics.keys())} differ from the expected {sorted(metric_keys)} "
                  f"({metric_keys_source})")
    if reason is None and global_arrays is not None:
        reason = _check_arrays(next(iter(array_records(content).values())), global_arrays, max_update_norm)
    return reason


def _check_weight(metrics: MetricRecord, weight_key: str) -> str | None:
    weight = metrics.get(weight_key)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        return f"metric {weight_key!r} must be a number, got {weight!r}"
    if not (math.isfinite(weight) and weight >= 0):
        return f"metric {weight_key!r} must be a finite number >= 0, got {weight!r}"
    return None


def _check_arrays(arrays: ArrayRecord, global_arrays: ArrayRecord, max_update_norm: float | None) -> str | None:
    missing = [k for k in global_arrays if k not in arrays]
    extra = [k for k in arrays if k not in global_arrays]
    if missing or extra:
        return f"array keys differ from the global model's: missing {missing}, unexpected {extra}"
    for key, ref in global_arrays.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape) or got.dtype != ref.dtype:
            return (f"{key!r} has shape {tuple(got.shape)} and dtype {got.dtype}; the global model's is "
                    f"{tuple(ref.shape)} {ref.dtype}")
    squared = 0.0
    for key, ref in global_arrays.items():
        try:
            value = to_numpy(arrays[key], copy=False)  # read, never written: a view of the reply's bytes
        except (ValueError, TypeError, EOFError) as exc:  # a malformed array is this reply's rejection
            return f"{key!r} is not a readable array: {exc}"
        bad = int(value.size - np.count_nonzero(np.isfinite(value))) if _is_inexact(value) else 0
        if bad:
            return f"{key!r} holds {bad} non-finite value(s) (NaN or infinity)"
        if max_update_norm is not None:
            diff = np.subtract(value, to_numpy(ref, copy=False), dtype=np.float64).ravel()
            squared += float(np.dot(diff, diff))
    if max_update_norm is not None and not math.sqrt(squared) <= max_update_norm:
        return f"update norm {math.sqrt(squared):.6g} exceeds max-update-norm {max_update_norm:g}"
    return None


def _is_inexact(value: np.ndarray[Any, Any]) -> bool:
    return bool(np.issubdtype(value.dtype, np.inexact))


def _metric_keys(msg: Message) -> frozenset[str] | None:
    """A well-formed reply's metric key set (None for an error reply or one without exactly one MetricRecord)."""
    if msg.has_error() or len(metric_records(msg.content)) != 1:
        return None
    return _training_keys(next(iter(metric_records(msg.content).values())))


def _training_keys(metrics: MetricRecord) -> frozenset[str]:
    """A reply's metric keys less the federated evaluation a round may fold into its train replies (P.RECEIVED_KEYS):
    those come and go by round, the training figures do not."""
    return frozenset(metrics.keys()).difference(P.RECEIVED_KEYS)


def _drop_received(msg: Message) -> None:
    """Take the folded evaluation out of an accepted reply: it is in the client's verdict (where the recording layer
    reads it), and the strategies below aggregate training figures only."""
    metrics = next(iter(metric_records(msg.content).values()))
    for key in P.RECEIVED_KEYS:
        if key in metrics:
            del metrics[key]


def _majority(counts: Counter[frozenset[str]], *, at_least: int = 1) -> frozenset[str] | None:
    """The key set most replies carried (ties: the larger set, then by name); None if fewer than ``at_least``."""
    if not counts:
        return None
    best = max(counts, key=lambda keys: (counts[keys], len(keys), sorted(keys)))
    return best if counts[best] >= at_least else None


def _numeric_metrics(msg: Message) -> dict[str, float]:
    record = metric_records(msg.content).get(P.METRICS)
    if record is None and len(metric_records(msg.content)) == 1:
        record = next(iter(metric_records(msg.content).values()))
    if record is None:
        return {}
    return usable_metrics(record)
