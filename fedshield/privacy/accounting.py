"""Privacy accounting as pure functions of the mechanism's parameters.

A mechanism's whole history is a list of ``(noise_multiplier, sample_rate, steps)``: the sampled Gaussian
mechanism run ``steps`` times. Every epsilon fedshield reports is ``epsilon(history, delta, accountant)``, so anyone
holding the numbers written beside it can recompute it with Opacus alone. PRV is the default (tightest of Opacus'
accountants); RDP is offered as a looser, widely known cross-check; GDP is refused.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache

from ..config import ACCOUNTANTS
from ..errors import ConfigError, PrivacyError

__all__ = ["HistoryEntry", "compact_history", "epsilon", "calibrate_noise_multiplier"]

HistoryEntry = tuple[float, float, int]


def compact_history(history: Iterable[Sequence[float]]) -> tuple[HistoryEntry, ...]:
    """Merge consecutive entries with the same ``(sigma, q)``; composition only depends on the counts."""
    merged: list[list[float]] = []
    for sigma, q, steps in history:
        if int(steps) <= 0:
            continue
        if merged and merged[-1][0] == float(sigma) and merged[-1][1] == float(q):
            merged[-1][2] += int(steps)
        else:
            merged.append([float(sigma), float(q), int(steps)])
    return tuple((s, q, int(n)) for s, q, n in merged)


def epsilon(history: Iterable[Sequence[float]], *, delta: float, accountant: str = "prv") -> float:
    """Epsilon spent by ``history`` at ``delta``. Empty history: 0. Any step without noise: infinity."""
    _check_accountant(accountant)
    if not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    return _epsilon_cached(compact_history(history), float(delta), accountant)


@lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(entry) for entry in history]
    with _single_threaded_blas(), _quiet_prv_domain(accountant):
        value = float(acc.get_epsilon(delta=delta))
    if math.isnan(value):
        raise PrivacyError(f"{accountant} accountant returned NaN for history {history}; refusing to report it")
    return value


@lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """Smallest noise multiplier (to Opacus' search tolerance) whose ``steps`` steps stay within the budget.

    Calibrate ONCE for the whole planned run: calibrating each round for the full target overspends.
    """
    _check_accountant(accountant)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    from opacus.accountants.utils import get_noise_multiplier

    with _single_threaded_blas(), _quiet_prv_domain(accountant):
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                accountant=accountant, epsilon_tolerance=0.01,
            )
        )
    # get_noise_multiplier stops at a sigma whose epsilon is within tolerance *below* the target; check it.
    spent = epsilon([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    if spent > target_epsilon * (1 + 1e-9):
        raise PrivacyError(f"calibration overshot: sigma {sigma} gives epsilon {spent} > target {target_epsilon}")
    return sigma


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run the accountant's NumPy on one BLAS thread.

    Why: the PRV accountant's ``np.dot`` over its discretised mesh, called from a ServerApp thread (Flower runs
    the ServerApp in a thread beside the simulation engine's), was seen spinning forever in OpenBLAS'
    ``exec_blas`` (7 minutes at 100% CPU on one calibration that takes 0.2 s in a fresh process). With one
    thread OpenBLAS computes in the caller and never waits on its thread pool; the vectors are small enough that
    nothing is lost.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@contextmanager
def _quiet_prv_domain(accountant: str) -> Iterator[None]:
    """The PRV accountant sizes its mesh with an RDP bound, and Opacus warns when that bound's best order is the
    last alpha. Under PRV the reported epsilon does not come from that bound, so the warning says nothing about it;
    under the RDP accountant it does (a tighter bound exists), so it is left to show there."""
    if accountant != "prv":
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha",
                                category=UserWarning, module=r"opacus\.accountants\.analysis\.rdp")
        yield


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {name!r}: choose one of {', '.join(ACCOUNTANTS)}")
