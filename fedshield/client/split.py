"""A deployed site's own train/test split, chosen once and kept in its state directory.

Why: evaluation metrics leave the site in clear. If the server's ``seed`` chose which records are held out, a
hostile server could rotate the seed and read metrics of a different held-out set each run, and learn about
individual records from the differences. The site therefore draws its split seed from the OS entropy pool on first
start, saves it atomically in ``<state-dir>/split.json`` and reuses it ever after. The file is bound to a
fingerprint of the data (SHA-256 of the loaded arrays): a changed data file is noticed and refused with the fix,
instead of silently moving records between training and evaluation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_json
from ..errors import ConfigError

__all__ = ["SPLIT_FILE", "data_fingerprint", "site_split"]

SPLIT_FILE = "split.json"
_FORMAT = "fedshield-split-1"


def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (x, y):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def site_split(state_dir: Path, fingerprint: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, test) indices of this site's records: a fifth held out, chosen by the site's own seed."""
    seed = _seed(Path(state_dir) / SPLIT_FILE, fingerprint, n)
    perm = np.random.default_rng(seed).permutation(n)
    k = max(1, n // 5)
    return np.sort(perm[k:]), np.sort(perm[:k])


def _seed(path: Path, fingerprint: str, n: int) -> int:
    if not path.exists():
        seed = int.from_bytes(os.urandom(16), "big")
        atomic_write_json(path, {"format": _FORMAT, "seed": str(seed), "fingerprint": fingerprint, "records": n},
                          mode=0o600)
        return seed
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        seed, saved = int(raw["seed"]), str(raw["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"this site's split file {path} is unreadable ({err}); restore it, or move it away "
                          "knowingly (records held out so far may then be trained on)") from None
    if saved != fingerprint:
        raise ConfigError(
            f"the data file changed since this site chose its train/test split ({path} was made for other data): "
            "records held out for evaluation could move into training. Use the original data, or move the split "
            "file away knowingly to choose a new split"
        )
    return seed
