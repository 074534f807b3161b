"""Opacus' per-order RDP of the sampled Gaussian mechanism, memoised while fedshield's accountant runs.

Why: Opacus' PRV accountant sizes its mesh with an RDP bound (``analysis/prv/domain.py:compute_safe_domain_size``)
over 151 orders, 90 of them fractional, each a pure-Python series; that is ~97% of a PRV epsilon (0.77 CPU-s of
0.78 for a 12-step history on a quiet core) and it is computed twice per call for the same ``(q, sigma)``. A run
asks for the same ``(q, sigma)`` again every round (each round's report, each site's ledger charge), and the noise
calibration's bisection asks twice per candidate. ``_compute_rdp(q, sigma, alpha)`` is a pure function of its three
floats, so caching it changes no value: every epsilon is bit-for-bit Opacus' own (``tests/test_rdp_memo.py``), and
calibration fell from 14.5 to 3.4 CPU-s, a later epsilon from 0.77 to 0.02 s (``benchmarks/RESULTS.md``
``accounting_memo``).

The memo is installed only while :func:`memoised_rdp` is entered (under ``accounting._ACCOUNTANT_LOCK``) and the
original restored after: Opacus outside fedshield's accountant is untouched. If Opacus renames the function the
accountant runs unmemoised (slower, same values) and a warning says so once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

__all__ = ["memoised_rdp"]

_TARGET = "_compute_rdp"
_memos: dict[Callable[..., float], Callable[..., float]] = {}
_warned: list[bool] = []


@contextmanager
def memoised_rdp() -> Iterator[None]:
    """Inside the block Opacus' ``analysis.rdp._compute_rdp`` answers from a per-process cache. Re-entrant: a
    nested entry (calibration calling epsilon) leaves the outer memo in place. Not thread-safe by itself: the
    caller holds the accountant lock, as every Opacus accountant call in fedshield does."""
    from opacus.accountants.analysis import rdp

    original = getattr(rdp, _TARGET, None)
    if original is None or not callable(original):
        if not _warned:
            _warned.append(True)
            warnings.warn(f"opacus.accountants.analysis.rdp.{_TARGET} is gone: privacy accounting runs "
                          "unmemoised (same values, several times slower)", RuntimeWarning, stacklevel=3)
        yield
        return
    if original in _memos.values():  # nested: already memoised
        yield
        return
    memo = _memos.get(original)
    if memo is None:
        memo = _memos[original] = lru_cache(maxsize=1 << 16)(original)
    setattr(rdp, _TARGET, memo)
    try:
        yield
    finally:
        setattr(rdp, _TARGET, original)
