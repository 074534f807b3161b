"""Two real processes charge one ledger concurrently, many times: with the flock around read-charge-write, not
one charge is lost (without it, two read-modify-write cycles that overlap keep only one of the two charges)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger

CHARGES = 40
_WORKER = """
import sys, time
from pathlib import Path
from fedshield.privacy.ledger import charge_ledger
path, name, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
while not go.exists():
    time.sleep(0.01)
for r in range(1, int(sys.argv[4]) + 1):
    charge_ledger(path, accountant="rdp", delta=1e-5, budget=None, noise_multiplier=1.0, sample_rate=0.5,
                  steps=2, run_id=name, server_round=r)
"""


def test_two_processes_charging_one_ledger_lose_no_charge(tmp_path: Path, no_leftover_processes: None) -> None:
    path, go = tmp_path / LEDGER_FILE, tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(path), name, str(go), str(CHARGES)])
             for name in ("a", "b")]
    try:
        time.sleep(1.0)  # both import fedshield first, so their charges overlap in time
        go.touch()
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert codes == [0, 0]
    ledger = PrivacyLedger.load(path)
    assert len(ledger.rounds) == 2 * CHARGES
    assert sorted(ledger.rounds) == sorted((n, r) for n in ("a", "b") for r in range(1, CHARGES + 1))
    assert ledger.history == ((1.0, 0.5, 2 * 2 * CHARGES),)
    # The two writers interleaved (otherwise the test proves nothing about concurrency).
    order = [n for n, _ in ledger.rounds]
    assert sum(a != b for a, b in zip(order, order[1:])) >= 2, order
    assert (tmp_path / (LEDGER_FILE + ".lock")).stat().st_mode & 0o777 == 0o600
    assert not list(tmp_path.glob(f".{LEDGER_FILE}.*.tmp"))
