"""Held pulls: fedshield's SuperLink answers an empty pull when something arrives (or its hold ends), and its clients
(the SuperNode's loop, the ServerApp's StreamingGrid) then pull again at once instead of sleeping a poll interval.

The wrappers are tested on their own with pulls we script; the installed ones in a real SuperLink process, pulled by
a node through Flower's own authenticated Fleet client (tests/test_deploy_e2e.py and every other deployment test
run their rounds through them too)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fedshield.flower_internals import held_pulls
from fedshield.flower_internals.held_pulls import Arrivals
from fedshield.strategies import streaming
from fedshield.strategies.streaming import StreamingGrid

from _strategy_rounds import client_models, configure, reply
from flwr.serverapp.strategy import FedAvg


def test_a_caller_holds_one_pull_per_topic_and_the_total_is_capped() -> None:
    arrivals = Arrivals(max_held=2)
    with arrivals.watch("t", "node-1") as first, arrivals.watch("t", "node-1") as again:
        assert first is not None and again is None  # the same caller's second pull on a topic is answered at once
        with arrivals.watch("t", "node-2") as other, arrivals.watch("u", "node-3") as over:
            assert other is not None and over is None and arrivals.held == 2  # the cap
            arrivals.notify(["u", "v"])
            assert not first.is_set() and not other.is_set()  # only the named topic wakes
            arrivals.notify(["t"])
            assert first.is_set() and other.is_set()
    assert arrivals.held == 0
    with arrivals.watch("t", "node-1") as later:
        assert later is not None and not later.is_set()  # a new pull waits afresh


def _scripted(answers: list[Any]) -> tuple[list[float], Any]:
    """A pull answering ``answers`` in turn (each call's time recorded)."""
    calls: list[float] = []

    def pull(request: Any, context: Any) -> Any:
        calls.append(time.monotonic())
        return answers[len(calls) - 1]

    return calls, pull


def _held(pull: Any, arrivals: Arrivals, hold_s: float, wanted: bool = True) -> Any:
    return held_pulls._held(pull, arrivals, lambda a: (("ins", a["request"]), a["request"]), lambda r: not r,
                           lambda a: wanted, hold_s)


def test_an_empty_pull_is_answered_again_when_its_topic_is_notified() -> None:
    arrivals = Arrivals(8)
    calls, pull = _scripted([[], ["message"]])
    waiter = threading.Timer(0.2, arrivals.notify, [[("ins", 7)]])
    waiter.start()
    start = time.monotonic()
    assert _held(pull, arrivals, hold_s=30.0)(7, None) == ["message"]
    assert len(calls) == 2 and 0.15 < calls[1] - start < 25  # woken by the notify, not by the 30 s hold
    waiter.join()


def test_a_pull_with_an_answer_a_timed_out_hold_and_a_gone_caller_are_each_pulled_once() -> None:
    arrivals = Arrivals(8)
    calls, pull = _scripted([["now"]])
    assert _held(pull, arrivals, hold_s=30.0)(1, None) == ["now"] and len(calls) == 1  # never held
    calls, pull = _scripted([[]])
    assert _held(pull, arrivals, hold_s=0.05)(1, None) == [] and len(calls) == 1  # the empty answer it had
    calls, pull = _scripted([[]])
    threading.Timer(0.05, arrivals.notify, [[("ins", 1)]]).start()
    assert _held(pull, arrivals, hold_s=30.0, wanted=False)(1, None) == [] and len(calls) == 1  # caller went away
    assert arrivals.held == 0


def test_a_pull_over_the_cap_is_answered_at_once() -> None:
    arrivals = Arrivals(8)
    calls, pull = _scripted([[]])
    with arrivals.watch(("ins", 3), 3):  # this node already has a pull held
        start = time.monotonic()
        assert _held(pull, arrivals, hold_s=30.0)(3, None) == []
        assert time.monotonic() - start < 10 and len(calls) == 1


@pytest.mark.usefixtures("task_identity")
def test_the_streaming_grid_pulls_again_at_once_after_a_held_pull_or_an_arrival(monkeypatch: pytest.MonkeyPatch
                                                                                ) -> None:
    """No sleep after a pull the SuperLink held (it already waited) nor after a reply (the next pull is held until
    the next reply); the usual wait after an empty pull answered at once (Flower's own SuperLink)."""
    monkeypatch.setattr(streaming, "HELD_PULL_S", 0.05)
    slept: list[float] = []

    class Clock:  # the grid's clock, whose sleeps are only recorded
        monotonic = staticmethod(time.monotonic)
        sleep = staticmethod(slept.append)

    monkeypatch.setattr(streaming, "time", Clock)
    messages = configure(FedAvg(min_available_nodes=2, min_train_nodes=2), 2)
    model = client_models(1)[0]

    class Link:  # a deployment's grid (no wait_for_replies): empty at once, then held, then the replies
        pulls = 0

        def push_messages(self, msgs: Any) -> list[str]:
            self.pushed = list(msgs)
            return [m.metadata.message_id for m in self.pushed]

        def pull_messages(self, ids: Any) -> list[Any]:
            self.pulls += 1
            if self.pulls == 1:
                return []  # answered at once: the grid sleeps
            if self.pulls == 2:
                time.sleep(0.08)  # held by the SuperLink
                return []
            return [reply(self.pushed[self.pulls - 3], model, 1.0)]

    grid = StreamingGrid(Link(), pull_interval=0.2, quick_interval=0.05, quick_window=2.0)  # type: ignore[arg-type]
    assert len(list(grid.send_and_receive(messages, timeout=30))) == 2
    assert slept == [0.05]  # only after the pull answered at once


def test_the_installed_superlink_handlers_are_held_and_notify(tmp_path: Any) -> None:
    """In a fresh process (the test process keeps Flower's own handlers): every handler the SuperLink launcher wraps
    is wrapped, idempotently, and still has the arguments the wrappers read. Fails when Flower moves one."""
    code = (
        "from fedshield.flower_internals.held_pulls import hold_empty_pulls, _WRAPPED\n"
        "from flwr.server.superlink.fleet.grpc_rere.fleet_servicer import FleetServicer as F\n"
        "from flwr.server.superlink.fleet.message_handler import message_handler as m\n"
        "from flwr.superlink.servicer.runtime import runtime_handlers as r\n"
        "a = hold_empty_pulls(); assert hold_empty_pulls() == a\n"
        "for f in (F.PullMessages, m.pull_object, m.push_messages, m.push_object, r.pull_messages, r.pull_object,\n"
        "          r.push_messages, r.push_object):\n"
        "    assert getattr(f, _WRAPPED, False), f\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr


def test_a_real_superlink_holds_a_nodes_empty_pull(tmp_path: Path) -> None:
    """A registered node (Flower's own authenticated Fleet client, in this process) pulls from a real fedshield
    SuperLink with nothing queued: the pull is held about HOLD_S, not answered at once, and answers empty."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.client.grpc_rere_client.connection import grpc_request_response
    from flwr.supercore.retry.grpc_retry import make_simple_grpc_retry_invoker

    from fedshield.crypto import init_keys
    from fedshield.deploy import ServerTls, SuperLinkConfig, free_port, start_superlink
    from fedshield.deploy.superlink_main import HOLD_S

    keys = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=1)
    superlink = start_superlink(SuperLinkConfig(
        run_dir=tmp_path / "superlink", fleet_address=f"127.0.0.1:{free_port()}", control_port=free_port(),
        tls=ServerTls.from_keyset(keys), node_auth=True))
    try:
        node = keys.node("node-1")
        superlink.register_node(node.public_key, name=node.name)
        private = load_ssh_private_key(node.private_key_path.read_bytes(), None)
        with grpc_request_response(superlink.fleet_address, insecure=False,
                                   retry_invoker=make_simple_grpc_retry_invoker(),
                                   root_certificates=keys.ca_cert.read_bytes(),
                                   authentication_keys=(private, private.public_key())) as conn:  # type: ignore[arg-type]
            receive = conn[1]
            took = []
            for _ in range(2):
                start = time.monotonic()
                assert receive() is None
                took.append(time.monotonic() - start)
        assert min(took) >= 0.8 * HOLD_S, took  # held, where Flower's own SuperLink answers in milliseconds
    finally:
        superlink.stop()
    assert superlink.process.remaining_pids() == []
