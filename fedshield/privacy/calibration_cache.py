"""Calibrated noise multipliers remembered across processes; a remembered one is used only after Opacus re-checks it.

Why: calibrating sigma is Opacus' bisection over ~8 PRV evaluations (about 4 CPU-s for the default run, most of a
simulation's time before round 1), and every run of an unchanged configuration calibrates the same
``(epsilon, delta, q, steps, accountant)`` again: each ``fedshield simulate`` and each deployed ServerApp is a new
process. One PRV evaluation is an eighth of that, and the calibration check computes it anyway.

Trust: the file is a hint, never a source of privacy. A remembered sigma is used only if Opacus' accountant,
computed now, puts its epsilon in ``[target - tolerance, target]``, the band Opacus' own bisection ends in (the
caller's check, :func:`fedshield.privacy.accounting.calibrate_noise_multiplier`). A stale, corrupted or forged
entry therefore cannot overspend the budget, nor add more noise than calibration would: it is recomputed. Entries
are keyed by Opacus' version as well, since a new accountant may calibrate differently.

Where: ``$FEDSHIELD_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fedshield`` or ``~/.cache/fedshield`` (mode 0700,
the file 0600, written atomically). An unwritable or unreadable cache is skipped: calibration never fails for it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from ..atomic import atomic_write_text

__all__ = ["CACHE_ENV", "cache_file", "recall", "remember"]

log = logging.getLogger(__name__)

CACHE_ENV = "FEDSHIELD_CACHE_DIR"
_FILE = "calibration.json"
#: Entries kept, newest last: a few hundred configurations is more than anyone iterates over.
_MAX_ENTRIES = 512


def cache_file() -> Path:
    """The cache file's path (it may not exist yet)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit) / _FILE
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fedshield" / _FILE


def _key(*, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
         tolerance: float) -> str:
    from opacus import __version__ as opacus_version

    return json.dumps([opacus_version, accountant, repr(float(target_epsilon)), repr(float(delta)),
                       repr(float(sample_rate)), int(steps), repr(float(tolerance))])


def _load(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, float)} if isinstance(data, dict) else {}


def recall(**key: float | int | str) -> float | None:
    """The sigma remembered for this calibration, or None. Unverified: the caller must check it."""
    value = _load(cache_file()).get(_key(**key))  # type: ignore[arg-type]
    return value if value is not None and math.isfinite(value) and value > 0 else None


def remember(sigma: float, **key: float | int | str) -> None:
    """Remember a calibrated ``sigma`` (best effort: a cache that cannot be written is skipped with a debug line)."""
    path = cache_file()
    entries = _load(path)
    k = _key(**key)  # type: ignore[arg-type]
    entries.pop(k, None)
    entries[k] = float(sigma)
    keep = dict(list(entries.items())[-_MAX_ENTRIES:])
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(keep, indent=0) + "\n", mode=0o600)
    except OSError as exc:
        log.debug("calibration cache %s not written: %s", path, exc)
