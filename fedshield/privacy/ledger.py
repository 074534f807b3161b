"""A client's privacy ledger: the lifetime record of what its data has been used for, kept on its own disk.

Flower rebuilds the client every round and keeps ``context.state`` only in SuperNode memory, so a lifetime budget
has to live on disk. The ledger is written *before* a round trains (write-ahead): a crash after the write can only
over-count epsilon, never under-count it, and every write is atomic (temp file + rename), so a kill -9 at any
moment leaves either the old ledger or the new one.

Two processes may share one state directory (a site running two SuperNodes, or a worker restarted while the old
one finishes a round): :func:`charge_ledger` holds an exclusive ``fcntl.flock`` on a lock file beside the ledger
across read-charge-write, so no charge is ever lost to a concurrent writer.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json
from ..errors import BudgetExhaustedError, LedgerError
from .accounting import HistoryEntry, compact_history, epsilon

__all__ = ["PrivacyLedger", "LEDGER_FILE", "LEDGER_FORMAT", "charge_ledger", "ledger_lock"]

LEDGER_FILE = "privacy-ledger.json"
LEDGER_FORMAT = "fedshield-ledger/1"


@dataclass(frozen=True)
class PrivacyLedger:
    """Immutable snapshot of a client's spend; every change returns a new ledger.

    Attributes:
        accountant, delta: fix how epsilon is computed; a ledger never mixes two.
        budget: the epsilon this client will not exceed, or ``None`` for no cap.
        history: ``(noise_multiplier, sample_rate, steps)`` of every charged DP-SGD round.
        rounds: ``[run_id, server_round]`` of every charged round, in order.
        refused: ``[run_id, server_round]`` of rounds the client refused on its budget.
    """

    accountant: str
    delta: float
    budget: float | None
    history: tuple[HistoryEntry, ...] = ()
    rounds: tuple[tuple[str, int], ...] = ()
    refused: tuple[tuple[str, int], ...] = field(default=())

    @property
    def epsilon(self) -> float:
        return epsilon(self.history, delta=self.delta, accountant=self.accountant)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    @property
    def exhausted(self) -> bool:
        return bool(self.refused)

    def projected_epsilon(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        return epsilon(
            (*self.history, (noise_multiplier, sample_rate, steps)), delta=self.delta, accountant=self.accountant
        )

    def charge(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, run_id: str, server_round: int
    ) -> PrivacyLedger:
        """Return the ledger after one more round, or raise :class:`BudgetExhaustedError` if it would overspend."""
        after = self.projected_epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        if self.budget is not None and after > self.budget * (1 + 1e-9):
            raise BudgetExhaustedError(
                f"training round {server_round} would raise epsilon from {self.epsilon:.4g} to {after:.4g}, past "
                f"this client's budget of {self.budget:g} (delta {self.delta:g}, {self.accountant}); "
                "the client refuses. Raise the budget only with the data owner's consent, or stop the run."
            )
        return replace(
            self,
            history=compact_history((*self.history, (noise_multiplier, sample_rate, steps))),
            rounds=(*self.rounds, (run_id, server_round)),
        )

    def refuse(self, *, run_id: str, server_round: int) -> PrivacyLedger:
        return replace(self, refused=(*self.refused, (run_id, server_round)))

    # --- persistence -------------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        eps = self.epsilon
        return {
            "format": LEDGER_FORMAT,
            "accountant": self.accountant,
            "delta": self.delta,
            "budget": self.budget,
            "history": [list(h) for h in self.history],
            "rounds": [list(r) for r in self.rounds],
            "refused": [list(r) for r in self.refused],
            # Derived, written for humans; recomputed from history on load and compared.
            "epsilon": eps if math.isfinite(eps) else None,
        }

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> PrivacyLedger:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise LedgerError(f"privacy ledger {path} cannot be read ({exc}); fix its permissions") from None
        except json.JSONDecodeError as exc:
            raise LedgerError(
                f"privacy ledger {path} is not valid JSON ({exc}); it is never reset silently: restore it from "
                "a backup, or move it away knowingly to start a new ledger"
            ) from None
        if not isinstance(raw, dict) or raw.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{path} is not a fedshield privacy ledger (expected format {LEDGER_FORMAT!r})")
        try:
            return cls(
                accountant=str(raw["accountant"]),
                delta=float(raw["delta"]),
                budget=None if raw["budget"] is None else float(raw["budget"]),
                history=compact_history(raw["history"]),
                rounds=tuple((str(r), int(n)) for r, n in raw["rounds"]),
                refused=tuple((str(r), int(n)) for r, n in raw["refused"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"privacy ledger {path} is malformed ({exc!r}); restore it from a backup") from None

    @classmethod
    def open(cls, path: Path, *, accountant: str, delta: float, budget: float | None) -> PrivacyLedger:
        """Load the ledger at ``path``, or start an empty one; a mismatched mechanism is an error, not a reset."""
        path = Path(path)
        _sweep_stale_temps(path)
        if not path.exists():
            return cls(accountant=accountant, delta=delta, budget=budget)
        ledger = cls.load(path)
        if ledger.accountant != accountant or not math.isclose(ledger.delta, delta, rel_tol=1e-12):
            raise LedgerError(
                f"privacy ledger {path} accounts with {ledger.accountant} at delta {ledger.delta:g}, but this run "
                f"asks for {accountant} at delta {delta:g}: epsilons at different deltas do not add up. Use the "
                "ledger's accountant and delta, or a new --state directory for a new data set"
            )
        if budget is not None and (ledger.budget is None or budget < ledger.budget):
            # A budget can only ever be tightened from the outside; loosening it needs a deliberate edit.
            ledger = replace(ledger, budget=budget)
        return ledger


@contextmanager
def ledger_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``<ledger>.lock`` (created 0600 beside the ledger) for the block.

    The lock file, not the ledger, is locked: the ledger is replaced by rename on every write, so a lock on its
    inode would be lost with the old file. The kernel drops the lock if the holder dies (kill -9 included).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def charge_ledger(
    path: Path, *, accountant: str, delta: float, budget: float | None, noise_multiplier: float, sample_rate: float,
    steps: int, run_id: str, server_round: int,
) -> PrivacyLedger:
    """Open, charge and save the ledger at ``path`` under :func:`ledger_lock`; return the charged ledger.

    Write-ahead: the spend is on disk before the caller touches any data. A refusal is recorded (under the same
    lock) and :class:`BudgetExhaustedError` raised.
    """
    with ledger_lock(path):
        ledger = PrivacyLedger.open(path, accountant=accountant, delta=delta, budget=budget)
        try:
            charged = ledger.charge(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                                    run_id=run_id, server_round=server_round)
        except BudgetExhaustedError:
            ledger.refuse(run_id=run_id, server_round=server_round).save(path)
            raise
        charged.save(path)
        return charged


def _sweep_stale_temps(path: Path) -> None:
    """Remove temp files a writer killed mid-write left beside the ledger (the ledger itself is intact).

    Only safe while no other process is writing: :func:`charge_ledger` calls it under the ledger lock."""
    if path.parent.is_dir():
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
