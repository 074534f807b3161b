"""A run stopped while its SuperNode is still fetching a message: the ClientApp already pulling that message ends.

The race that kept the ClientApp zygote opt-in. Flower 1.39's SuperNode stores a message and creates its ClientApp
task before it has fetched the message's objects from the SuperLink; a run stopped during that fetch raised
``RunNotRunningException`` (a ``BaseException``) past Flower's clean-up, so the stored message, its never-available
objects and the live task stayed, and a ClientApp already pulling the message polled for them for up to 2 hours
(reproduced here before the fix with forked and with cold ClientApps alike; see
``fedshield.flower_internals.supernode``). Real processes: a SuperLink, one SuperNode (ClientApps forked from the
zygote, the default), the stall app, ``flwr stop``. To hold the state still, the ServerApp process is frozen
(SIGSTOP) mid-push once the node has the message, so the node keeps waiting for objects; then the run is stopped.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedshield.deploy import SuperLinkConfig, SuperNodeConfig, free_port, start_superlink, start_supernode, submit_run
from fedshield.deploy.process import live_descendants
from fedshield.flower_internals import supernode

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote forks and passes fds: Linux only"),
    pytest.mark.usefixtures("no_leftover_processes"),
]

STALL_APP = Path(__file__).parent / "apps" / "stall_app"
# 40 arrays of 1 MiB: ~80 objects (40 MiB) the ServerApp pushes two at a time: seconds on a small machine, and few
# enough that the SuperLink's SQLite store is never locked past its 5 s timeout (400 objects were, under load).
RUN_CONFIG = {"arrays": 40, "size": 262144}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes(root: int, name: str) -> list[int]:
    return [p for p in live_descendants(root) if name in _cmdline(p)]


def _wait(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.1)


def _receive_with_stopped_run(step: Callable[..., Any]) -> tuple[Any, Any, str]:
    """Drive Flower's receiving step with its real in-memory node state; the SuperLink calls are plain functions:
    the message arrives, then fetching its objects finds the run stopped (what the SuperLink's 403 raises)."""
    from flwr.app import ArrayRecord, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run, RunNotRunningException
    from flwr.supernode.nodestate import NodeStateFactory

    state = NodeStateFactory(ObjectStoreFactory()).state()
    state.set_node_id(7)
    run = Run.create_empty(1)
    state.store_run(run)  # a run this node already knows: no FAB to fetch
    message = Message(RecordDict({"arrays": ArrayRecord([np.zeros(3)])}), dst_node_id=7, message_type="train")
    message.metadata.__dict__["_message_id"] = message.object_id

    def stopped(*_: object) -> bytes:
        raise RunNotRunningException

    out = step(state=state, object_store=state.object_store, node_config={},
               receive=lambda: (message, get_object_tree(message)), get_run=lambda _: run, get_fab=lambda *_: None,
               pull_object=stopped, confirm_message_received=lambda *_: None, trusted_entities=None)
    return out, state, message.object_id


@pytest.mark.usefixtures("task_identity")
def test_the_stopped_run_leaves_no_message_and_no_live_task_in_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cause, in Flower's own node state: as Flower 1.39 ships, the message stays for a ClientApp to pull and
    its task stays pending (the SuperExec would start a ClientApp for it later); with the fix neither remains."""
    from flwr.supernode import start_client_internal as loop

    original = getattr(loop, supernode.RECEIVE_STEP)
    monkeypatch.setattr(loop, supernode.RECEIVE_STEP, original)  # restored after the test
    _, state, message_id = _receive_with_stopped_run(original)
    assert message_id in state.msg_store and [t.status.status for t in state.get_tasks()] == ["pending"]

    assert supernode.fail_receive_on_stopped_run() and supernode.fail_receive_on_stopped_run()  # once, idempotent
    out, state, message_id = _receive_with_stopped_run(getattr(loop, supernode.RECEIVE_STEP))
    assert out is None and state.msg_store == {} and state.object_store.get(message_id) is None
    (task,) = state.get_tasks()
    assert (task.status.status, task.status.sub_status) == ("finished", "failed"), task
    assert "the run stopped while this message was being received" in task.status.details


def test_a_run_stopped_mid_receive_ends_the_clientapp_pulling_its_message(tmp_path: Path) -> None:
    link = start_superlink(SuperLinkConfig(run_dir=tmp_path / "link", fleet_address=f"127.0.0.1:{free_port()}",
                                           control_port=free_port(), insecure=True, node_auth=False))
    node = None
    try:
        node = start_supernode(SuperNodeConfig(run_dir=tmp_path / "node", superlink=link.fleet_address,
                                               insecure=True, runtime_port=free_port(), site_code_only=False,
                                               name="site"))
        marker = tmp_path / "marker"
        run_id = submit_run(STALL_APP, link.connection, run_config={**RUN_CONFIG, "marker": str(marker)})
        node.process.wait_for_log(r"Receiving: train message", timeout=180)
        serverapps = _processes(link.process.pid, "flwr-serverapp")
        assert len(serverapps) == 1, f"expected the run's one ServerApp, found {serverapps}"
        os.kill(serverapps[0], signal.SIGSTOP)  # mid-push: the node now waits for objects that do not come
        try:
            assert marker.read_text() == "pushing", "the ServerApp finished its push before it was frozen"
            node.process.wait_for_log(r"Start `flwr-clientapp` process", timeout=120)
            shims = _processes(node.process.pid, "flwr-clientapp")
            assert shims, "the message's ClientApp is not running"
            time.sleep(2.0)  # it pulls its message and polls the missing objects (nothing else can move now)
            assert all(p in live_descendants(node.process.pid) for p in shims), "the ClientApp ended early"
            stop = link.connection.run_cli(["stop", str(run_id), link.connection.name], timeout=120)
            assert stop.returncode == 0, stop.stdout + stop.stderr
        finally:
            os.kill(serverapps[0], signal.SIGCONT)
        _wait(lambda: not _processes(node.process.pid, "flwr-clientapp"), 60, "the ClientApp to end")  # was: 2 h
        log = node.process.log_text()
        assert "the run stopped while this message was being received" in log, log[-3000:]
        assert "[/v1/runtime/pull-object][ApiError:1008]" in log, "the ClientApp was not refused while pulling"
        assert node.process.is_running(), "the SuperNode must carry on after a stopped run"
    finally:
        if node is not None:
            node.stop(grace=10)
        link.stop(grace=10)
