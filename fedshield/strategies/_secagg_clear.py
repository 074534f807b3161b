"""What the SecAgg+ server can check of a masked reply: the figures it sent in clear."""

from __future__ import annotations

from ._secagg_stages import MaskedReply, ProtocolParams
from .clear_values import check_clear_metrics
from .validation import REJECTED

__all__ = ["check_masked_clear"]


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
    reason = check_clear_metrics(reply.metrics)
    if reason is not None:
        return f"{REJECTED}: {reason}"
    share = (p.modulus_range - 1) // p.num_samples
    if p.q_ratio(reply.num_examples) > share:
        return (f"{REJECTED}: reported {reply.num_examples} examples; with {p.num_samples} nodes in the field "
                f"2^{p.modulus_range.bit_length() - 1} a node may report at most "
                f"{int(share / p.quantization_range * p.max_weight)} (max_weight {p.max_weight:g})")
    return None
