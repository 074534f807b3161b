"""One line of ``metrics.jsonl``: what a round did, from the strategy layers' :class:`RoundOutcomes`. Pure."""

from __future__ import annotations

from typing import Any

from .. import protocol as P
from ..strategies.outcomes import RoundOutcomes
from ..strategies.validation import REJECTED

__all__ = ["round_row", "outcome_counts", "failures", "outcome"]


def round_row(
    server_round: int, metrics: dict[str, float], outcomes: RoundOutcomes, *, epsilon_max: float | None,
    round_time_s: float, wall_time_s: float,
) -> dict[str, Any]:
    """The round's row: every figure finite or None (the file is strict JSON).

    ``metrics``: the server's own test loss and accuracy (empty when the task has no server test set);
    ``epsilon_max``: the largest record-level epsilon of any client so far (None without DP).
    """
    replies, fed, sizes = outcomes.replies, outcomes.evaluate, outcomes.bytes_up
    return {
        "round": server_round,
        "accuracy": metrics.get("accuracy"),
        "loss": metrics.get("loss"),
        "federated_accuracy": None if fed is None else _json_float(float(fed.get(P.EVAL_ACCURACY, float("nan")))),
        "federated_loss": None if fed is None else _json_float(float(fed.get(P.EVAL_LOSS, float("nan")))),
        # Whose model the federated figures are of: this round's, or (evaluation folded into the train messages,
        # strategies.recording) the previous round's, measured by this round's clients before they trained.
        "federated_round": None if fed is None else outcomes.evaluated_round,
        "clients_sampled": len(replies),
        "clients_trained": sum(r.ok for r in replies),
        "clients_evaluated": outcomes.evaluated,
        **outcome_counts(replies),
        "failed": failures(replies),
        "epsilon_max": None if epsilon_max is None else _json_float(epsilon_max),
        "bytes_up_per_client": round(sum(sizes) / len(sizes)) if sizes else None,
        "round_time_s": round(round_time_s, 3),
        "wall_time_s": round(wall_time_s, 3),
    }


def outcome_counts(replies: list[P.ClientReply]) -> dict[str, Any]:
    """The round's outcome columns: every client that did not train is counted in exactly one of refused (privacy
    budget spent), rejected (its update failed validation; ``rejected`` lists node and reason) or failed (an
    error reply, or no reply before the timeout)."""
    kinds = [outcome(r) for r in replies]
    prefix = f"{REJECTED}: "
    return {
        "clients_refused": kinds.count("refused"),
        "clients_rejected": kinds.count("rejected"),
        "clients_failed": kinds.count("failed"),
        "rejected": [{"node_id": r.node_id, "reason": str(r.error).removeprefix(prefix)[:500]}
                     for r, kind in zip(replies, kinds) if kind == "rejected"],
    }


def failures(replies: list[P.ClientReply]) -> list[dict[str, Any]]:
    """Node and reason of every client counted in ``clients_failed`` (e.g. "no reply before the round timed out")."""
    return [{"node_id": r.node_id, "reason": str(r.error)[:500]} for r in replies if outcome(r) == "failed"]


def outcome(reply: P.ClientReply) -> str:
    """``trained``, ``refused``, ``rejected`` or ``failed``."""
    if reply.error is None:
        return "trained"
    if P.BUDGET_REFUSAL in reply.error:
        return "refused"
    return "rejected" if reply.error.startswith(REJECTED) else "failed"


def _json_float(x: float) -> float | None:
    return x if x == x and x not in (float("inf"), float("-inf")) else None
