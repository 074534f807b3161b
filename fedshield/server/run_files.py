"""Read a run directory while a deployed run writes it: new metrics rows, the privacy report, the summary.

The ServerApp runs in its own process (Flower's ``flwr-serverapp``), so ``fedshield server`` learns of each round
from the files it writes atomically; these readers tolerate a file that does not exist yet or is being replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import RunConfig
from .records import RoundRecord, RunSummary

__all__ = ["MetricsTail", "file_identity", "read_json", "read_rows", "read_summary"]


def read_summary(config: RunConfig) -> RunSummary:
    """What the run directory says after a deployed run: rounds, privacy report, noise multiplier."""
    out = Path(config.out).expanduser().resolve()
    rows = read_rows(out / "metrics.jsonl")
    privacy = read_json(out / "privacy.json")
    sigma = (privacy.get("mechanism") or {}).get("noise_multiplier") or 0.0
    return RunSummary(config=config, noise_multiplier=float(sigma), rounds=rows, privacy=privacy)


class MetricsTail:
    """New rows of ``metrics.jsonl``; a file left by an earlier run in the same directory is ignored.

    The ServerApp appends each round's row, then replaces ``privacy.json``: a row is reported once
    ``privacy.json`` is at least as new, so its epsilons belong to the same round; a line still being appended
    is read on a later call.
    """

    def __init__(self, out: Path, num_rounds: int, stale: tuple[int, int] | None, *, done: int = 0) -> None:
        self.metrics, self.privacy, self.num_rounds = out / "metrics.jsonl", out / "privacy.json", num_rounds
        self._stale = stale
        self.rounds_seen = done

    def new_records(self, *, final: bool = False) -> list[RoundRecord]:
        ident = file_identity(self.metrics)
        if ident is None or ident == self._stale:
            return []
        privacy_ident = file_identity(self.privacy)
        if not final and (privacy_ident is None or privacy_ident[1] < ident[1]):
            return []
        rows = read_rows(self.metrics)[self.rounds_seen :]
        if not rows:
            return []
        clients = read_json(self.privacy).get("clients", {})
        epsilons = {str(name): c.get("epsilon") for name, c in clients.items() if isinstance(c, dict)}
        self.rounds_seen += len(rows)
        return [RoundRecord(int(r.get("round", 0)), self.num_rounds, r, epsilons) for r in rows]


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def read_rows(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line being appended: read on a later call
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
