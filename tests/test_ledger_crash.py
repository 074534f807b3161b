"""A client SIGKILLed while writing its privacy ledger, many times over: the ledger on disk is always a complete,
valid ledger, and the epsilon it holds never goes down (it never forgets a charged round)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger

WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from fedshield.privacy.ledger import PrivacyLedger
    path = Path(sys.argv[1])
    r = 0
    while True:  # charge and save as fast as possible until killed
        ledger = PrivacyLedger.open(path, accountant="rdp", delta=1e-5, budget=None)
        r += 1
        ledger.charge(noise_multiplier=1.0 + (r % 7) * 0.01, sample_rate=0.5, steps=2, run_id="crash",
                      server_round=r).save(path)
        print(r, flush=True)
    """
)


def test_sigkill_during_ledger_writes_never_corrupts_or_undercounts(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(1234)
    last_rounds, kills = 0, 0
    deadline = time.monotonic() + 60
    while kills < 12 and time.monotonic() < deadline:
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        proc.stdout.readline()  # wait until it has saved at least once: imports are done, writes are flowing
        time.sleep(rng.uniform(0.0, 0.05))  # land the kill anywhere inside the write loop
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        kills += 1
        ledger = PrivacyLedger.load(path)  # raises if the file were torn or half-written
        assert len(ledger.rounds) >= last_rounds, "a charged round disappeared from the ledger"
        assert ledger.steps == 2 * len(ledger.rounds), "history and rounds disagree"
        last_rounds = len(ledger.rounds)
    assert kills >= 8, f"only {kills} kills in the time allowed"
    # Stale temp files from killed writers are swept the next time the ledger is opened.
    PrivacyLedger.open(path, accountant="rdp", delta=1e-5, budget=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LEDGER_FILE, "writer.py"])
