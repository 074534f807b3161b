"""The SuperLink's expired-token sweep on run-status reads runs at most every CLEANUP_EVERY_S, and every other caller
of the sweep still runs it each time (fedshield.flower_internals.link_state). On Flower's real SQL link state, in a
fresh process (the test process keeps Flower's own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CODE = """
import time
from flwr.server.superlink.linkstate import LinkStateFactory
from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
from flwr.superlink.federation.noop_federation_manager import NoOpFederationManager
from flwr.supercore.object_store import ObjectStoreFactory
from fedshield.flower_internals.link_state import sweep_expired_tokens_less_often

flower_sweep, sweeps = SqlLinkState._cleanup_expired_task_tokens, []
def counted(self):
    sweeps.append(time.monotonic())
    flower_sweep(self)
SqlLinkState._cleanup_expired_task_tokens = counted
assert sweep_expired_tokens_less_often(every_s=3.0) and sweep_expired_tokens_less_often(every_s=3.0)
db = "{db}"
state = LinkStateFactory(db, NoOpFederationManager(), ObjectStoreFactory(db)).state()
assert isinstance(state, SqlLinkState)
for _ in range(20):
    state.get_run_status({{1}})
assert len(sweeps) == 1, sweeps  # status reads within 3 s: one sweep
time.sleep(3.1)
state.get_run_status({{1}})
assert len(sweeps) == 2, sweeps  # the next read after 3 s sweeps again
state.acknowledge_task_heartbeat(1); state.acknowledge_task_heartbeat(1)
assert len(sweeps) == 4, sweeps  # other callers sweep every time
print("ok")
"""


def test_status_reads_sweep_expired_tokens_at_most_every_interval_and_other_callers_always(tmp_path: Path) -> None:
    code = CODE.format(db=tmp_path / "state.db")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr
