"""What the SecAgg+ server can check of a masked reply: the figures it sent in clear."""

from __future__ import annotations

import logging

from ..protocol import NUM_EXAMPLES, PARTITION_ID, ClientReply
from ._secagg_stages import MaskedReply, ProtocolParams, RoundState
from .clear_values import COUNT_METRICS, check_clear_metrics, drop_bad_received
from .validation import REJECTED

__all__ = ["average_clear_metrics", "check_masked_clear", "reply_outcomes"]

_log = logging.getLogger(__name__)


def check_masked_clear(reply: MaskedReply, p: ProtocolParams) -> str | None:
    """Why a masked reply's clear figures rule it out of the round, or None.

    The server cannot see the weight a node folded into its masked vector, only the count it declared in clear.
    That count is checked against the field: each node may fold in at most its 1/n share of the modulus, so the
    declared weights of the round can never sum past it (one count of 1e12 used to wrap the sum and abort the
    round for everyone). A node that masks a weight other than the one it declared is caught by the integrity
    check on the unmasked sum, which cannot tell which node lied: that round is discarded as a whole.
    """
    if reply.num_examples < 0:
        return f"reported {reply.num_examples} examples; a count must be >= 0"
    bad = drop_bad_received(reply.metrics)  # a bad evaluation is left out; the masked vector still counts
    if bad is not None:
        _log.warning("SecAgg+ round: left a node's folded evaluation out: %s", bad)
    reason = check_clear_metrics(reply.metrics)
    if reason is not None:
        return f"{REJECTED}: {reason}"
    share = (p.modulus_range - 1) // p.num_samples
    if p.q_ratio(reply.num_examples) > share:
        return (f"{REJECTED}: reported {reply.num_examples} examples; with {p.num_samples} nodes in the field "
                f"2^{p.modulus_range.bit_length() - 1} a node may report at most "
                f"{int(share / p.quantization_range * p.max_weight)} (max_weight {p.max_weight:g})")
    return None


def average_clear_metrics(replies: list[MaskedReply]) -> dict[str, float]:
    """The clear metrics every included node sent, as one reply's (identifiers excluded): counts (steps, rounds
    trained) as their maximum, everything else as the example-weighted mean.

    Why the maximum for counts: a mean of whole numbers is not one (3.0000000000000004, or 3.5), and the synthetic
    reply passes the same clear-value checks as any reply (:mod:`.validation`); the maximum is a count that some
    node really reported.
    """
    keys = set.intersection(*(set(r.metrics) for r in replies)) - {NUM_EXAMPLES, PARTITION_ID}
    total = sum(r.num_examples for r in replies)
    weights = [r.num_examples / total if total else 1 / len(replies) for r in replies]
    return {k: float(max(r.metrics[k] for r in replies)) if k in COUNT_METRICS
            else float(sum(w * r.metrics[k] for w, r in zip(weights, replies, strict=True))) for k in sorted(keys)}


def reply_outcomes(state: RoundState, masked: dict[int, MaskedReply], aborted: str | None) -> list[ClientReply]:
    """One outcome per sampled node: its clear figures, and why it did not count (the round's abort, or its own)."""
    out = []
    for nid in state.sampled:
        reply = masked.get(nid)
        metrics = {} if reply is None else {NUM_EXAMPLES: float(reply.num_examples), **reply.metrics}
        if reply is not None and aborted is None:
            out.append(ClientReply(nid, metrics))
        else:
            reason = state.errors.get(nid) or f"round aborted: {aborted}"
            out.append(ClientReply(nid, metrics, error=reason))
    return out
