"""A client SIGKILLed while writing its privacy ledger, many times over: the ledger on disk is always a complete,
valid ledger, and it never forgets a charged round (so it can never under-count epsilon)."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger

ROUNDS = 20


def _ledgers() -> list[PrivacyLedger]:
    """Ledgers after 1..ROUNDS rounds, epsilons computed (and cached) here so the writer only writes."""
    out, ledger = [], PrivacyLedger(accountant="prv", delta=1e-5, budget=None)
    for r in range(1, ROUNDS + 1):
        ledger = ledger.charge(noise_multiplier=1.0, sample_rate=0.5, steps=2, run_id="crash", server_round=r)
        ledger.to_json()
        out.append(ledger)
    return out


def _write_forever(path: str, ledgers: list[PrivacyLedger], writing: Any) -> None:
    """Continue from what is on disk, one round further each save, as fast as possible until killed.

    ``writing`` is set after the first save: the parent's kill timer starts only then, so a slow fork on a busy
    machine cannot make every kill land before the first write (the kills must meet writes to prove anything).
    """
    while True:
        done = len(PrivacyLedger.load(Path(path)).rounds)
        ledgers[min(done, ROUNDS - 1)].save(Path(path))
        writing.set()


def test_sigkill_during_ledger_writes_never_corrupts_or_undercounts(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    PrivacyLedger(accountant="prv", delta=1e-5, budget=None).save(path)
    ledgers = _ledgers()  # also imports the accountant before forking (importing torch after fork can deadlock)
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1234)
    last_rounds = 0
    kills = 0
    for _ in range(60):
        writing = ctx.Event()
        proc = ctx.Process(target=_write_forever, args=(str(path), ledgers, writing), daemon=True)
        proc.start()
        assert writing.wait(timeout=30), "the writer never completed a save"
        time.sleep(rng.uniform(0.0, 0.004))  # a few writes at most: the kill lands anywhere in the cycle
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
        kills += 1
        ledger = PrivacyLedger.load(path)  # raises if the file were torn or half-written
        assert len(ledger.rounds) >= last_rounds, "a charged round disappeared from the ledger"
        assert ledger.history == ((1.0, 0.5, 2 * len(ledger.rounds)),) or not ledger.rounds
        last_rounds = len(ledger.rounds)
    assert kills == 60 and last_rounds == ROUNDS, f"only {last_rounds} rounds written: the kills never met a write"
    # Stale temp files from killed writers are swept the next time the ledger is opened.
    PrivacyLedger.open(path, accountant="prv", delta=1e-5, budget=None)
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER_FILE]
