"""Privacy accounting as pure functions of the mechanism's parameters.

A mechanism's whole history is a list of ``(noise_multiplier, sample_rate, steps)``: the sampled Gaussian
mechanism run ``steps`` times. Every epsilon fedshield reports is ``epsilon(history, delta, accountant)``, so anyone
holding the numbers written beside it can recompute it with Opacus alone. PRV is the default (tightest of Opacus'
accountants); RDP is offered as a looser, widely known cross-check; GDP is refused.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from functools import lru_cache
from queue import Empty, PriorityQueue

from ..config import ACCOUNTANTS
from ..errors import ConfigError, PrivacyError
from . import calibration_cache
from .rdp_memo import memoised_rdp

__all__ = ["HistoryEntry", "compact_history", "epsilon", "known_epsilon", "calibrate_noise_multiplier",
           "prefetch_epsilon", "cancel_prefetch", "wait_prefetched"]

HistoryEntry = tuple[float, float, int]
_Key = tuple[tuple[HistoryEntry, ...], float, str]

#: Held by whoever runs an accountant: the computation sets process-wide state (the BLAS thread count, warning
#: filters), which two threads must not enter and leave interleaved.
_ACCOUNTANT_LOCK = threading.RLock()
#: Epsilons being computed now, by history: a second caller waits for the first instead of computing it again.
_flights: dict[_Key, Future[float]] = {}
_flights_lock = threading.Lock()
#: Epsilons computed so far, readable without computing (:func:`known_epsilon`); oldest dropped past the bound.
_known: dict[_Key, float] = {}
_KNOWN_MAX = 4096


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
    return _single_flight(_key(history, delta, accountant))


def known_epsilon(history: Iterable[Sequence[float]], *, delta: float, accountant: str = "prv") -> float | None:
    """The epsilon of ``history`` if it has been computed in this process, else None; never computes.

    Why: a report written while a run goes on can say "pending" instead of making the run wait for an accountant
    whose cost grows with every round (:meth:`fedshield.server.report.PrivacyReport.client_level_json`).
    """
    key = _key(history, delta, accountant)
    if not key[0]:
        return 0.0
    with _flights_lock:
        return _known.get(key)


def prefetch_epsilon(
    histories: Iterable[Iterable[Sequence[float]]], *, delta: float, accountant: str = "prv", needed_by: int = 0
) -> None:
    """Start computing the epsilons of ``histories`` on a background thread; return at once.

    ``needed_by`` orders the work: lower first (a run passes the round whose report needs the history), then in
    the order handed over.

    Why: a run knows after round r which histories round r + 1 can produce (one more identical entry), so their
    epsilons are computed while round r + 1 trains, and :func:`epsilon` then finds them done (or waits for the
    one in progress instead of computing it twice). Nothing changes in the values: both paths run the same
    cached function on the same compacted history. A failure here is not reported: :func:`epsilon` raises it.
    """
    global _worker
    keys = [_key(h, delta, accountant) for h in histories]
    with _flights_lock:
        if _worker is None or not _worker.is_alive():
            _worker = threading.Thread(target=_prefetch_loop, name="fedshield-accounting", daemon=True)
            _worker.start()
    with _idle:
        _outstanding[0] += len(keys)
        for key in keys:
            _queue.put((needed_by, next(_order), key))


def cancel_prefetch() -> None:
    """Drop prefetches not yet started (the one in progress finishes; its result is cached)."""
    while True:
        try:
            _queue.get_nowait()
        except Empty:
            return
        _done_one()


def wait_prefetched(timeout: float) -> bool:
    """Block until every prefetch handed over so far is computed (True), or ``timeout`` seconds pass (False)."""
    with _idle:
        return _idle.wait_for(lambda: _outstanding[0] == 0, timeout=timeout)


_queue: PriorityQueue[tuple[int, int, _Key]] = PriorityQueue()
_order = itertools.count()
_worker: threading.Thread | None = None
_idle = threading.Condition()
_outstanding = [0]  # prefetches queued or in progress


def _fresh_state_in_forked_child() -> None:
    """A forked child starts with unlocked locks, no flights, no queue and no background thread.

    Why: a fork copies only the forking thread. If the background accountant held ``_ACCOUNTANT_LOCK`` (or another
    thread a flight) at that moment, the child's copy would stay locked forever, and its first epsilon (a DP-SGD
    client's ledger in a local simulation worker) would hang. A process that runs several simulations forks each
    pool while the previous run's background accountant may still be computing. Computed values stay known.
    """
    global _ACCOUNTANT_LOCK, _flights_lock, _queue, _worker, _idle
    _ACCOUNTANT_LOCK, _flights_lock = threading.RLock(), threading.Lock()
    _flights.clear()
    _queue, _worker, _idle = PriorityQueue(), None, threading.Condition()
    _outstanding[0] = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_state_in_forked_child)


def _done_one() -> None:
    with _idle:
        _outstanding[0] -= 1
        _idle.notify_all()


def _prefetch_loop() -> None:
    while True:
        _, _, key = _queue.get()
        try:
            _single_flight(key)
        except Exception:  # noqa: BLE001 - raised again, in the caller's thread, by epsilon()
            pass
        finally:
            _done_one()


def _key(history: Iterable[Sequence[float]], delta: float, accountant: str) -> _Key:
    _check_accountant(accountant)
    if not (0 < delta < 1):
        raise ConfigError(f"delta must be in (0, 1), got {delta}")
    return compact_history(history), float(delta), accountant


def _single_flight(key: _Key) -> float:
    """``_epsilon_cached(*key)``, computed by one thread at a time per key; others wait for its result."""
    with _flights_lock:
        flight = _flights.get(key)
        owner = flight is None
        if flight is None:
            flight = _flights[key] = Future()
    if not owner:
        return flight.result()
    try:
        value = _epsilon_cached(*key)
    except BaseException as exc:
        with _flights_lock:
            _flights.pop(key, None)
        flight.set_exception(exc)
        raise
    with _flights_lock:  # known before the flight ends: known_epsilon never sees a gap
        if len(_known) >= _KNOWN_MAX:
            del _known[next(iter(_known))]
        _known[key] = value
        _flights.pop(key, None)
    flight.set_result(value)
    return value


@lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[HistoryEntry, ...], delta: float, accountant: str) -> float:
    if not history:
        return 0.0
    if any(sigma <= 0 for sigma, _, _ in history):
        return math.inf
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(entry) for entry in history]
    quiet = _quiet_prv_domain(accountant, _unamplified(history))
    with _ACCOUNTANT_LOCK, _single_threaded_blas(), memoised_rdp(), quiet:
        value = float(acc.get_epsilon(delta=delta))
    if math.isnan(value):
        raise PrivacyError(f"{accountant} accountant returned NaN for history {history}; refusing to report it")
    return value


#: Opacus' bisection stops within this much below the target epsilon.
CALIBRATION_TOLERANCE = 0.01


@lru_cache(maxsize=256)
def calibrate_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "prv"
) -> float:
    """Smallest noise multiplier (to Opacus' search tolerance) whose ``steps`` steps stay within the budget.

    Opacus' ``get_noise_multiplier``, or the sigma it gave for the same inputs in an earlier process
    (:mod:`~fedshield.privacy.calibration_cache`), accepted only if its epsilon, computed now, lies in the band
    Opacus' bisection ends in. Calibrate ONCE for the whole planned run: calibrating each round for the full target
    overspends.
    """
    _check_accountant(accountant)
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise ConfigError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    key = {"target_epsilon": target_epsilon, "delta": delta, "sample_rate": sample_rate, "steps": steps,
           "accountant": accountant, "tolerance": CALIBRATION_TOLERANCE}
    remembered = calibration_cache.recall(**key)
    if remembered is not None:
        spent = epsilon([(remembered, sample_rate, steps)], delta=delta, accountant=accountant)
        if target_epsilon - CALIBRATION_TOLERANCE <= spent <= target_epsilon:
            return remembered
    from opacus.accountants.utils import get_noise_multiplier

    with _ACCOUNTANT_LOCK, _single_threaded_blas(), memoised_rdp(), _quiet_prv_domain(accountant, sample_rate >= 1):
        sigma = float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                accountant=accountant, epsilon_tolerance=CALIBRATION_TOLERANCE,
            )
        )
    # get_noise_multiplier stops at a sigma whose epsilon is within tolerance *below* the target; check it.
    spent = epsilon([(sigma, sample_rate, steps)], delta=delta, accountant=accountant)
    if spent > target_epsilon * (1 + 1e-9):
        raise PrivacyError(f"calibration overshot: sigma {sigma} gives epsilon {spent} > target {target_epsilon}")
    calibration_cache.remember(sigma, **key)
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


def _unamplified(history: Sequence[HistoryEntry]) -> bool:
    return any(q >= 1 for _, q, _ in history)


@contextmanager
def _quiet_prv_domain(accountant: str, unamplified: bool = False) -> Iterator[None]:
    """The PRV accountant sizes its mesh with an RDP bound, and Opacus warns when that bound's best order is the
    last alpha. Under PRV the reported epsilon does not come from that bound, so the warning says nothing about it;
    under the RDP accountant it does (a tighter bound exists), so it is left to show there.

    ``unamplified`` (a sample rate of 1: client-level DP under fixed-size sampling): Opacus takes ``log(1 - q)``,
    which is -inf at q = 1 and warns although the result is right, and RDP's best order is then the largest alpha
    by construction; both warnings are silenced. Only ever entered under ``_ACCOUNTANT_LOCK``: warning filters are
    process-wide, and two threads leaving such blocks out of order would leave the wrong filters behind."""
    with warnings.catch_warnings():
        if accountant == "prv":
            warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha",
                                    category=UserWarning, module=r"opacus\.accountants\.analysis\.rdp")
        if unamplified:
            warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        yield


def _check_accountant(name: str) -> None:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {name!r}: choose one of {', '.join(ACCOUNTANTS)}")
