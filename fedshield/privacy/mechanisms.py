"""Epsilon of a history, whichever record-level mechanism wrote it: one entry point for reports and recomputation.

``accountant`` names the mechanism's accountant: Opacus' (``prv``, ``rdp``) for DP-SGD histories
``(sigma, q, steps)``, :data:`SKELLAM_ACCOUNTANT` for distributed-mode histories ``(total_mu, l1, l2, q, steps)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .accounting import epsilon as dpsgd_epsilon
from .skellam_accountant import epsilon as skellam_epsilon

__all__ = ["SKELLAM_ACCOUNTANT", "history_epsilon", "history_steps"]

SKELLAM_ACCOUNTANT = "skellam-rdp"


def history_epsilon(history: Iterable[Sequence[float]], *, delta: float, accountant: str) -> float:
    if accountant == SKELLAM_ACCOUNTANT:
        return skellam_epsilon(history, delta=delta)
    return dpsgd_epsilon(history, delta=delta, accountant=accountant)


def history_steps(history: Iterable[Sequence[float]]) -> int:
    return sum(int(h[-1]) for h in history)
