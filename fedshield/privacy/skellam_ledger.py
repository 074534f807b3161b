"""A site's ledger of distributed-mode (Skellam) rounds, beside its DP-SGD ledger, on its own disk.

Why a second file: the DP-SGD ledger's history is ``(sigma, q, steps)`` of the sampled Gaussian and is accounted by
Opacus; a distributed round is another mechanism (:mod:`.skellam_accountant`, history ``(total_mu, l1, l2, q,
steps)``). The two are composed conservatively: the site's spend is the sum of the two epsilons at the same delta
(basic composition), and the budget check uses that sum. Same discipline as the DP-SGD ledger: written *before*
the round computes anything (write-ahead), atomically, under the same ``flock``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..errors import BudgetExhaustedError, LedgerError
from .ledger import LEDGER_FILE, PrivacyLedger, ledger_lock
from .skellam_accountant import epsilon as skellam_epsilon

__all__ = ["SKELLAM_LEDGER_FILE", "charge_skellam", "load_history"]

SKELLAM_LEDGER_FILE = "privacy-ledger-distributed.json"
_FORMAT = "fedshield-skellam-ledger/1"


def load_history(path: Path) -> tuple[float, list[list[float]], list[list[Any]]]:
    """``(delta, history, rounds)`` of the ledger at ``path``; raises LedgerError when unreadable (never reset)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("format") != _FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        return float(raw["delta"]), [list(map(float, h)) for h in raw["history"]], list(raw["rounds"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise LedgerError(f"distributed-DP ledger {path} cannot be read ({exc}); restore it from a backup") from None


def charge_skellam(
    state_dir: Path, *, entry: list[float], delta: float, budget: float | None, run_id: str, server_round: int,
) -> float:
    """Charge one distributed round; return the site's total epsilon (DP-SGD ledger + distributed ledger).

    Raises :class:`BudgetExhaustedError` (nothing written) when the total would pass ``budget``.
    """
    path = Path(state_dir) / SKELLAM_LEDGER_FILE
    with ledger_lock(path):
        history, rounds = [], []
        if path.exists():
            old_delta, history, rounds = load_history(path)
            if not math.isclose(old_delta, delta, rel_tol=1e-12):
                raise LedgerError(f"distributed-DP ledger {path} accounts at delta {old_delta:g}, this run asks for "
                                  f"{delta:g}: use the ledger's delta or a new --state directory")
        local = _local_epsilon(Path(state_dir) / LEDGER_FILE)
        after = local + skellam_epsilon([*history, entry], delta=delta)
        if budget is not None and after > budget * (1 + 1e-9):
            raise BudgetExhaustedError(
                f"distributed round {server_round} would raise this site's epsilon to {after:.4g}, past its budget "
                f"of {budget:g} (delta {delta:g}); the site refuses. Raise the budget only with the data owner's "
                "consent, or stop the run.")
        history.append(list(entry))
        rounds.append([run_id, server_round])
        atomic_write_json(path, {"format": _FORMAT, "delta": delta, "budget": budget, "history": history,
                                 "rounds": rounds, "epsilon": skellam_epsilon(history, delta=delta)}, mode=0o600)
        return after


def _local_epsilon(path: Path) -> float:
    return PrivacyLedger.load(path).epsilon if path.exists() else 0.0
