"""Accounting ahead of need (issue 13): the report's epsilons are computed while the next round trains, and they are
the very figures a fresh Opacus accountant gives for the histories written beside them.

Real parts: the real RunReporter (privacy report, run directory, checkpoint), Opacus' PRV accountant, the real
background thread. The replies are the data a round's strategy layers hand the reporter.
"""

from __future__ import annotations

import functools
import json
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from opacus.accountants import create_accountant
from threadpoolctl import threadpool_info

from fedshield import protocol as P
from fedshield.config import RunConfig
from fedshield.privacy import accounting
from fedshield.privacy.client_level_mechanism import client_level_epsilon
from fedshield.server.accounting_ahead import next_round_histories
from fedshield.server.plan import plan_run
from fedshield.server.report import recompute_client_epsilon, recompute_epsilon
from fedshield.server.reporter import RunReporter
from fedshield.strategies.outcomes import ReleaseEvent, RoundOutcomes

DELTA = 1e-5
#: Values no other test uses, so the process-wide cache cannot already hold these histories.
Z, SIGMA = 1.3579, 2.4680


def _opacus(history: list[list[float]]) -> float:
    """The figure straight from Opacus, no fedshield code between (the old code path's value)."""
    return _opacus_once(tuple((float(s), float(q), int(n)) for s, q, n in history))


@functools.cache
def _opacus_once(history: tuple[tuple[float, float, int], ...]) -> float:
    acc = create_accountant(mechanism="prv")
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # q = 1: Opacus' log(1 - q) warns, harmlessly
        return float(acc.get_epsilon(delta=DELTA))


@pytest.fixture
def accountant_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of the thread behind every accountant Opacus builds (one per epsilon actually computed)."""
    import opacus.accountants as opacus_accountants

    names: list[str] = []
    real = opacus_accountants.create_accountant

    def recording(*args: Any, **kwargs: Any) -> Any:
        names.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(opacus_accountants, "create_accountant", recording)
    return names


def _round(reporter: RunReporter, r: int, partitions: list[int], threads: list[str]) -> dict[str, Any]:
    outcomes = RoundOutcomes(release=ReleaseEvent(r, Z, 1.0, float(len(partitions)), float(len(partitions))))
    outcomes.settle([P.ClientReply(100 + p, {P.PARTITION_ID: float(p)}) for p in partitions])
    before = len(threads)
    record = reporter.record_round(r, {"w": torch.zeros(3)}, {"accuracy": 0.5}, outcomes)
    assert threading.current_thread().name not in threads[before:], (
        f"round {r}: the report computed an epsilon itself that the background thread should have had ready")
    return record.row


def test_the_report_finds_every_epsilon_computed_ahead_and_equal_to_opacus(
        tmp_path: Path, accountant_threads: list[str]) -> None:
    config = RunConfig(num_clients=3, num_rounds=3, secagg=False, noise_multiplier=SIGMA, sample_rate=1.0,
                       local_epochs=1, client_dp="central", client_noise_multiplier=Z, client_clip_norm=1.0,
                       out=tmp_path / "run")
    reporter = RunReporter(plan_run(config), {})
    reporter.start_round()  # hands round 1's histories to the background thread
    # Client 2 sits out round 2: two distinct record-level histories must both be ready in round 3.
    for r, partitions in [(1, [0, 1, 2]), (2, [0, 1]), (3, [0, 1, 2])]:
        assert accounting.wait_prefetched(timeout=300), "the background accountant did not finish"
        row = _round(reporter, r, partitions, accountant_threads)
        privacy = reporter.summary.privacy
        section = privacy["client_level"]
        assert section["history"] == [[Z, 1.0, r]]
        if r < 3:  # while the run goes on the client-level epsilon is never waited for: pending unless known
            assert section["epsilon"] in (None, _opacus(section["history"]))
        else:  # the planned run's, computed in the background since round 1
            assert section["epsilon"] == _opacus(section["history"]) == recompute_client_epsilon(section)
        for entry in privacy["clients"].values():
            assert entry["epsilon"] == _opacus(entry["history"]) == recompute_epsilon(entry) > 0
        assert row["epsilon_max"] == max(e["epsilon"] for e in privacy["clients"].values())
    assert privacy["clients"]["client-2"]["history"] == [[SIGMA, 1.0, 2]]  # 2 of the 3 rounds, 1 full-batch step each
    assert "fedshield-accounting" in accountant_threads
    reporter.finish()


def test_next_round_histories_are_one_planned_round_past_each_distinct_record_history(tmp_path: Path) -> None:
    config = RunConfig(num_clients=3, num_rounds=5, secagg=False, noise_multiplier=SIGMA, sample_rate=1.0,
                       local_epochs=1, client_dp="central", client_noise_multiplier=Z, client_clip_norm=1.0,
                       out=tmp_path / "run")
    plan = plan_run(config)
    reporter = RunReporter(plan, {})
    reporter.report.record_client_level(1, ReleaseEvent(1, Z, 1.0, 3.0, 3.0))
    reporter.report.clients.clear()
    assert next_round_histories(reporter.report, plan, 2) == [[(SIGMA, 1.0, 1)]]
    off = RunReporter(plan_run(config.replace(dp=False, client_dp="off", client_noise_multiplier=None, client_clip_norm=None, out=tmp_path / "off")), {})
    assert next_round_histories(off.report, off.plan, 2) == []


def test_concurrent_accounting_leaves_warning_filters_and_blas_threads_as_it_found_them() -> None:
    """The accountant sets process-wide state (warning filters, BLAS threads); the background thread and a caller
    computing at once must neither interleave it nor leave it changed, and a caller asking for a history in flight
    gets the in-flight result."""
    filters, blas = list(warnings.filters), [i["num_threads"] for i in threadpool_info()]
    ahead = [[(Z, 1.0, n)] for n in (7, 8, 9)]
    accounting.prefetch_epsilon(ahead, delta=DELTA)
    results: dict[int, float] = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, client_level_epsilon([(Z, 1.0, n)], delta=DELTA)))
               for n in (8, 10)]
    for t in threads:
        t.start()
    mine = accounting.epsilon([(SIGMA, 0.25, 11)], delta=DELTA)  # record-level, beside them
    for t in threads:
        t.join(timeout=300)
    assert accounting.wait_prefetched(timeout=300)
    assert results[8] == _opacus([[Z, 1.0, 8]]) and results[10] == _opacus([[Z, 1.0, 10]])
    assert mine == _opacus([[SIGMA, 0.25, 11]])
    assert list(warnings.filters) == filters
    assert [i["num_threads"] for i in threadpool_info()] == blas



def test_known_epsilon_never_computes(accountant_threads: list[str]) -> None:
    history = [(Z, 1.0, 21)]
    assert accounting.known_epsilon(history, delta=DELTA) is None
    assert accounting.known_epsilon([], delta=DELTA) == 0.0
    assert accountant_threads == []  # asking computed nothing
    value = client_level_epsilon(history, delta=DELTA)
    assert accounting.known_epsilon(history, delta=DELTA) == value
    assert value == pytest.approx(_opacus([list(h) for h in history]), rel=1e-12)  # BLAS threads: last-bit noise


def test_a_report_during_the_run_never_waits_for_the_client_level_epsilon(tmp_path: Path) -> None:
    """Rounds before the last write a pending client-level epsilon (null, beside its history); the last round's
    report has the exact figure; finish() completes a run that stopped early."""
    config = RunConfig(num_clients=2, num_rounds=4, secagg=False, dp=False, client_dp="central",
                       client_noise_multiplier=Z + 0.01, client_clip_norm=1.0, out=tmp_path / "run")
    reporter = RunReporter(plan_run(config), {})
    accounting._ACCOUNTANT_LOCK.acquire()  # the background accountant cannot finish anything meanwhile
    try:
        for r in (1, 2):
            outcomes = RoundOutcomes(release=ReleaseEvent(r, Z + 0.01, 1.0, 2.0, 2.0))
            outcomes.settle([P.ClientReply(100 + p, {P.PARTITION_ID: float(p)}) for p in (0, 1)])
            reporter.record_round(r, {"w": torch.zeros(3)}, {"accuracy": 0.5}, outcomes)
            section = reporter.summary.privacy["client_level"]
            assert section["epsilon"] is None and section["epsilon_pending"] is True
            assert section["history"] == [[Z + 0.01, 1.0, r]] and "pending" in section["statement"]
    finally:
        accounting._ACCOUNTANT_LOCK.release()
    reporter.flush()  # round 2's files are written in the background
    written = json.loads((config.out / "privacy.json").read_text())["client_level"]
    assert written["epsilon"] is None and written["rounds_released"] == 2
    summary = reporter.finish()  # stopped after 2 of 4 rounds: the summary and the file get the exact figure
    section = summary.privacy["client_level"]
    assert section["epsilon_pending"] is False
    assert section["epsilon"] == _opacus(section["history"]) == recompute_client_epsilon(section)
    assert json.loads((config.out / "privacy.json").read_text())["client_level"] == section


def test_a_run_resumed_after_its_last_round_still_ends_with_the_final_report(tmp_path: Path) -> None:
    """Killed after the last round's checkpoint but before its privacy.json: the resumed run has no round left to
    report, and finish() writes the final report itself (not an empty summary, not round N-1's pending epsilon)."""
    config = RunConfig(num_clients=2, num_rounds=2, secagg=False, dp=False, client_dp="central",
                       client_noise_multiplier=Z + 0.02, client_clip_norm=1.0, out=tmp_path / "run")
    reporter = RunReporter(plan_run(config), {})
    reporter.report.load_client_level([{"round": r, "noise_multiplier": Z + 0.02, "sample_rate": 1.0,
                                        "included_clients": 2.0, "expected_clients": 2.0, "clipped_updates": 0.0}
                                       for r in (1, 2)])  # what the checkpoint restores
    section = reporter.finish().privacy["client_level"]
    assert section["epsilon_pending"] is False and section["history"] == [[Z + 0.02, 1.0, 2]]
    assert section["epsilon"] == recompute_client_epsilon(section) > 0
    assert json.loads((config.out / "privacy.json").read_text())["client_level"] == section


def test_a_child_forked_while_the_accountant_holds_its_lock_can_still_account() -> None:
    """A real fork while another thread holds the accountant's lock (as the background accountant may when a process
    forks its next simulation's workers): the child computes its epsilon instead of waiting forever."""
    import os
    import signal
    import time

    import opacus.accountants  # noqa: F401  (imported here, so the child does not spend its time importing)

    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with accounting._ACCOUNTANT_LOCK:
            held.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert held.wait(10)
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 3
            try:
                code = 0 if accounting.epsilon([(Z, 1.0, 6)], delta=DELTA) > 0 else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 180
        while (status := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if status[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on the accountant's lock copied locked from its parent")
        assert os.waitstatus_to_exitcode(status[1]) == 0
    finally:
        release.set()
        holder.join(timeout=60)
