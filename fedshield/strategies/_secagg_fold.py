"""SecAgg+ stage 2 on the server in O(model) memory: fold each masked vector into a running sum as it arrives.

Unmasking needs only the sum of the masked vectors (modulo the field) and the seeds recovered in stage 3, never
one node's vector, so nothing but the running sum and the reply being read is held: with a lazy grid
(:class:`~fedshield.strategies.streaming.StreamingGrid`) the server's peak memory stays about two int64 vectors
of the model's size plus one reply, whatever the number of clients (it used to list every reply, then every
widened vector).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from flwr.app import Message
from ..flower_internals.secagg_keys import Stage

from ._secagg_stages import MaskedReply, RoundState, Shape, Vector, read_masked_reply

__all__ = ["FieldSum", "fold_masked_replies"]

_log = logging.getLogger(__name__)


class FieldSum:
    """``sum_i v_i mod modulus`` over int64 vectors, one at a time, in place."""

    def __init__(self, modulus: int) -> None:
        self.modulus = modulus
        self.total: Vector | None = None

    def add(self, vector: Vector) -> None:
        if self.total is None:
            # np.array: a 0-d result of np.mod is a scalar, which cannot be an ``out`` below
            self.total = [np.array(np.mod(np.asarray(v, dtype=np.int64), self.modulus), dtype=np.int64) for v in vector]
            return
        for acc, v in zip(self.total, vector, strict=True):
            # v: the wire's uint32 (added without a widened copy) or int64; a malformed negative entry is caught
            # by the integrity check on the unmasked sum, like any wrong mask.
            np.add(acc, v, out=acc, casting="safe")
            np.mod(acc, self.modulus, out=acc)

    def value(self) -> Vector:
        if self.total is None:
            raise ValueError("no masked vectors to sum")
        return self.total


def fold_masked_replies(
    state: RoundState, replies: Iterable[Message], shapes: list[Shape], field: FieldSum,
    check: Callable[[MaskedReply], str | None],
) -> dict[int, MaskedReply]:
    """Read stage-2 replies one by one; fold each good vector into ``field``; return the included nodes' clear
    figures (their :class:`MaskedReply` without the vector).

    Bookkeeping as :func:`~fedshield.strategies._secagg_stages.settle`: an error reply's reason is kept
    verbatim, a node that sent nothing "timed out", ``state.active`` becomes the nodes that replied without error.
    A malformed reply, or one ``check`` rules out (its reason returned), leaves the node out of the sum.
    A second reply from one node is ignored: folding it twice would corrupt the sum.
    """
    expected, replied, ok, included = set(state.active), set(), set(), {}
    for reply in replies:
        nid = reply.metadata.src_node_id
        if nid not in expected or nid in replied:
            _log.warning("SecAgg+ stage %s: ignoring a reply from node %d (not asked, or a second reply)",
                         Stage.COLLECT_MASKED_VECTORS, nid)
            continue
        replied.add(nid)
        if reply.has_error():
            state.errors[nid] = reply.error.reason or f"error reply with code {reply.error.code} and no reason"
            continue
        ok.add(nid)
        reason, masked = _read(reply, shapes, check)
        if masked is None:
            state.errors[nid] = reason or "malformed reply"
            continue
        field.add(masked.vector)
        included[nid] = MaskedReply([], masked.num_examples, masked.metrics)  # drop the vector now
    for nid in expected - replied:
        state.errors[nid] = f"timed out in stage {Stage.COLLECT_MASKED_VECTORS}"
    state.active = ok
    return included


def _read(reply: Message, shapes: list[Shape], check: Callable[[MaskedReply], str | None]) -> tuple[Any, Any]:
    try:
        masked = read_masked_reply(reply.content, shapes, widen=False)  # no int64 copy per reply
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(inf) is an OverflowError
        return f"malformed reply in stage {Stage.COLLECT_MASKED_VECTORS}: {exc!r}", None
    reason = check(masked)
    return (reason, None) if reason is not None else (None, masked)
