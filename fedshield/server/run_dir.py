"""Claiming a run directory for a new run: an existing run is never replaced unless the operator says so.

A run directory holds what cannot be made again: the metrics and privacy report of rounds that sites paid privacy
budget for, and the checkpoint a crashed run resumes from. Starting a new run into it (the same ``--out`` typed
twice, or the default ``runs/latest``) used to replace all of that silently. Now ``--out`` with an existing run
needs ``--resume`` (continue it) or ``--force`` (replace it; its checkpoint is removed first, so no later
``--resume`` can mix the old run's state with the new run's settings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ConfigError
from .checkpoint import CHECKPOINT_FILE

__all__ = ["RUN_FILES", "claim_run_dir"]

#: Files a run writes at the top of its directory; ``--force`` removes them before the new run starts.
RUN_FILES = ("config.json", "metrics.jsonl", "privacy.json", "model.safetensors", CHECKPOINT_FILE,
             "accuracy.png", "epsilon.png")
#: What else a fedshield run directory may hold: the deployed server's SuperLink home, simulated clients' ledgers.
_OWN_DIRS = ("superlink", "clients")


def claim_run_dir(out: Path, *, force: bool = False) -> Path:
    """The absolute run directory for a NEW run; raises ConfigError (one line) instead of touching an existing
    run, a foreign non-empty directory or an unwritable place. With ``force`` an existing run's files go first."""
    out = Path(out).expanduser().resolve()
    existing = out
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write the run directory {out}: {existing} is not a writable directory; "
                          "choose another --out")
    if not out.is_dir():
        return out
    names = {p.name for p in out.iterdir()}
    if names and not names & {*RUN_FILES, *_OWN_DIRS}:
        raise ConfigError(f"--out {out} exists and is not a fedshield run directory: choose an empty or new directory")
    if names & set(RUN_FILES):
        if not force:
            raise ConfigError(f"--out {out} already holds a run ({_progress(out)}): continue it with --resume {out}, "
                              "replace it with --force, or choose another --out")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    return out


def _progress(out: Path) -> str:
    try:
        rounds = json.loads((out / "config.json").read_text(encoding="utf-8")).get("num_rounds", "?")
    except (OSError, ValueError, AttributeError):
        rounds = "?"
    try:
        text = (out / "metrics.jsonl").read_text(encoding="utf-8", errors="replace")
        done = sum(1 for line in text.split("\n")[:-1] if line.strip())  # whole lines: a torn last one is no round
    except OSError:
        done = 0
    return f"{done} of {rounds} rounds done"
