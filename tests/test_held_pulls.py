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
from types import SimpleNamespace
from typing import Any

import pytest

from fedshield.flower_internals import held_pulls
from fedshield.flower_internals.held_pulls import Arrivals
from fedshield.protocol import HELD_PULL_S, PULL_HOLD_S
from fedshield.strategies import streaming
from fedshield.strategies.streaming import StreamingGrid

from _strategy_rounds import client_models, configure, reply
from flwr.serverapp.strategy import FedAvg


def test_a_caller_holds_one_pull_per_topic_a_few_in_all_and_the_total_is_capped() -> None:
    arrivals = Arrivals(max_held=3, per_caller=2)
    with arrivals.watch("t", "node-1") as first, arrivals.watch("t", "node-1") as again:
        assert first is not None and again is None  # the same caller's second pull on a topic is answered at once
        with arrivals.watch("u", "node-1") as second, arrivals.watch("v", "node-1") as third:
            assert second is not None and third is None  # per caller, across topics (one object id each)
        with arrivals.watch("t", "node-2") as other, arrivals.watch("u", "node-3") as fourth:
            with arrivals.watch("w", "node-4") as over:
                assert other is not None and fourth is not None and over is None and arrivals.held == 3  # the cap
            arrivals.notify(["u", "v"])
            assert fourth.is_set() and not first.is_set() and not other.is_set()  # only the named topics wake
            arrivals.notify(["t"])
            assert first.is_set() and other.is_set()
    assert arrivals.held == 0
    with arrivals.watch("t", "node-1") as later, arrivals.watch("u", "node-1") as more:
        assert later is not None and more is not None and not later.is_set()  # released: new pulls wait afresh


def _scripted(answers: list[Any], during_first: Any = None) -> tuple[list[float], Any]:
    """A pull answering ``answers`` in turn (each call's time recorded); ``during_first()`` runs inside the first
    call, after the wrapper registered its watch and before the pull answers (a push landing mid-pull)."""
    calls: list[float] = []

    def pull(request: Any, context: Any) -> Any:
        calls.append(time.monotonic())
        if len(calls) == 1 and during_first is not None:
            during_first()
        return answers[len(calls) - 1]

    return calls, pull


def _held(pull: Any, arrivals: Arrivals, hold_s: float, wanted: bool = True) -> Any:
    return held_pulls._held(pull, arrivals, lambda a: (("ins", a["request"]), a["request"]), lambda r: not r,
                           lambda a: wanted, hold_s)


def _notify_after_first_pull(arrivals: Arrivals, topic: Any, calls: list[float]) -> threading.Thread:
    """A push 0.2 s after the pull has begun (so after its watch is registered), from another thread."""
    def push() -> None:
        while not calls:
            time.sleep(0.01)
        time.sleep(0.2)
        arrivals.notify([topic])

    thread = threading.Thread(target=push)
    thread.start()
    return thread


def test_an_empty_pull_is_answered_again_when_its_topic_is_notified() -> None:
    arrivals = Arrivals(8)
    calls, pull = _scripted([[], ["message"]])
    pusher = _notify_after_first_pull(arrivals, ("ins", 7), calls)
    assert _held(pull, arrivals, hold_s=30.0)(7, None) == ["message"]
    assert len(calls) == 2 and 0.15 < calls[1] - calls[0] < 25  # woken by the notify, not by the 30 s hold
    pusher.join()


def test_a_push_stored_while_the_pull_runs_is_not_missed() -> None:
    """The watch is registered before the pull: a notify during the (empty) pull wakes the wait at once."""
    arrivals = Arrivals(8)
    calls, pull = _scripted([[], ["message"]], during_first=lambda: arrivals.notify([("ins", 5)]))
    start = time.monotonic()
    assert _held(pull, arrivals, hold_s=30.0)(5, None) == ["message"]
    assert len(calls) == 2 and time.monotonic() - start < 25


def test_a_wake_that_finds_nothing_waits_on_to_the_end_of_the_hold() -> None:
    """A push that stored nothing (a bogus or late reply from a registered site) wakes the pull; it pulls, finds
    nothing, and waits again for a real arrival or the end of its hold, instead of answering empty at once."""
    arrivals = Arrivals(8)
    answers = [[], [], ["message"]]
    calls: list[float] = []

    def pull(request: Any, context: Any) -> list[str]:
        calls.append(time.monotonic())
        if len(calls) == 1:
            arrivals.notify([("ins", 4)])  # the spurious push, while the first pull runs
        if len(calls) == 2:  # the re-pull found nothing; the real push comes 0.2 s later, while it waits on
            threading.Timer(0.2, arrivals.notify, [[("ins", 4)]]).start()
        return answers[len(calls) - 1]

    assert _held(pull, arrivals, hold_s=30.0)(4, None) == ["message"] and len(calls) == 3
    assert calls[2] - calls[1] < 25  # woken by the real push, not by the hold
    calls, pull = _scripted([[], []], during_first=lambda: arrivals.notify([("ins", 4)]))
    start = time.monotonic()
    assert _held(pull, arrivals, hold_s=0.3)(4, None) == [] and len(calls) == 2
    assert time.monotonic() - start >= 0.3  # the spurious wake did not end the hold


def test_pushes_that_store_nothing_cannot_keep_a_pull_past_its_hold() -> None:
    """A site pushing bogus replies under a run's id as fast as the pull repeats (a notify inside every pull): the
    pull still answers by the end of its hold, not when the pushes stop."""
    arrivals = Arrivals(8)
    start = time.monotonic()
    calls: list[float] = []

    def pull(request: Any, context: Any) -> list[str]:
        calls.append(time.monotonic())
        if time.monotonic() - start < 20:  # the pushes go on for 20 s
            arrivals.notify([("ins", 6)])
        return []

    assert _held(pull, arrivals, hold_s=0.3)(6, None) == []
    assert time.monotonic() - start < 10 and len(calls) > 1


def test_a_pull_with_an_answer_a_timed_out_hold_and_a_gone_caller_are_each_pulled_once() -> None:
    arrivals = Arrivals(8)
    calls, pull = _scripted([["now"]])
    assert _held(pull, arrivals, hold_s=30.0)(1, None) == ["now"] and len(calls) == 1  # never held
    calls, pull = _scripted([[]])
    assert _held(pull, arrivals, hold_s=0.05)(1, None) == [] and len(calls) == 1  # the empty answer it had
    calls, pull = _scripted([[], ["claimed for nobody"]], during_first=lambda: arrivals.notify([("ins", 1)]))
    start = time.monotonic()
    assert _held(pull, arrivals, hold_s=30.0, wanted=False)(1, None) == [] and len(calls) == 1  # caller went away
    assert time.monotonic() - start < 25 and arrivals.held == 0


def test_a_push_that_stored_nothing_wakes_nobody_and_one_that_raised_after_storing_does() -> None:
    arrivals = Arrivals(8)
    refused = held_pulls._notifying(lambda request: SimpleNamespace(stored=False), arrivals,
                                    lambda r: [("obj", r)], stored=lambda response: bool(response.stored))
    with arrivals.watch(("obj", "x"), 1) as woken:
        refused("x")
        assert woken is not None and not woken.is_set()

    def partly(request: Any) -> None:
        raise RuntimeError("the second message of the batch was malformed")

    batch = held_pulls._notifying(partly, arrivals, lambda r: [("ins", r)])
    with arrivals.watch(("ins", 9), 9) as woken:
        with pytest.raises(RuntimeError):
            batch(9)
        assert woken is not None and woken.is_set()


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
    the next reply); the usual wait after an empty pull answered at once (Flower's own SuperLink). On a clock only
    the scripted pulls advance."""
    slept: list[float] = []

    class Clock:  # the grid's clock: a held pull takes HOLD_S, everything else no time
        now = 0.0

        @staticmethod
        def monotonic() -> float:
            return Clock.now

        @staticmethod
        def sleep(seconds: float) -> None:
            slept.append(seconds)
            Clock.now += seconds

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
                Clock.now += PULL_HOLD_S  # held by the SuperLink for its whole hold
                return []
            return [reply(self.pushed[self.pulls - 3], model, 1.0)]

    grid = StreamingGrid(Link(), pull_interval=0.2, quick_interval=0.05, quick_window=2.0)  # type: ignore[arg-type]
    assert len(list(grid.send_and_receive(messages, timeout=30))) == 2
    assert slept == [0.05]  # only after the pull answered at once


WAKE_CODE = """
import threading, time
from types import SimpleNamespace
from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, PushMessagesRequest
from flwr.proto.message_pb2 import Message, PullObjectRequest, PullObjectResponse, PushObjectRequest
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullAppMessagesResponse, PushAppMessagesRequest
from flwr.server.superlink.fleet.grpc_rere.fleet_servicer import FleetServicer as F
from flwr.server.superlink.fleet.message_handler import message_handler as m
from flwr.superlink.servicer.runtime import runtime_handlers as r
from fedshield.flower_internals import held_pulls

NODE, RUN, SOURCE = 2**64 - 5, 2**64 - 11, 2**64 - 17  # uint64 ids above 2**63 (Flower stores sint64), told apart
calls, asked = {}, threading.Event()
def scripted(name, empty, full):
    def pull(*args):  # each pull: empty the first time, then the message or object
        calls[name] = calls.get(name, 0) + 1
        asked.set()  # the wrapper has registered its watch before this first pull
        return empty if calls[name] == 1 else full
    return pull
msg = Message(); msg.metadata.dst_node_id = NODE; msg.metadata.src_node_id = SOURCE; msg.metadata.run_id = RUN
flower = dict(  # Flower's handlers, scripted, with their own parameter names
    fleet_pull=lambda self, request, context: scripted("fleet_pull", PullMessagesResponse(),
                                                       PullMessagesResponse(messages_list=[msg]))(),
    fleet_obj=lambda request, state: scripted("fleet_obj", PullObjectResponse(object_found=True),
                                              PullObjectResponse(object_found=True, object_available=True))(),
    rt_pull=lambda request, state, task: scripted("rt_pull", PullAppMessagesResponse(),
                                                  PullAppMessagesResponse(messages_list=[msg]))(),
    rt_obj=lambda request, state, task: scripted("rt_obj", PullObjectResponse(object_found=True),
                                                 PullObjectResponse(object_found=True, object_available=True))())
F.PullMessages, m.pull_object = flower["fleet_pull"], flower["fleet_obj"]
r.pull_messages, r.pull_object = flower["rt_pull"], flower["rt_obj"]
m.push_messages = m.push_object = lambda request, state: None
r.push_messages = r.push_object = lambda request, state, task: None
held_pulls.hold_empty_pulls(hold_s=30.0)

active = SimpleNamespace(is_active=lambda: True)
task = SimpleNamespace(run_id=RUN)
ours = SimpleNamespace(get_run_info=lambda run_ids: [SimpleNamespace(fab_id="fedshield/fedshield-app")])
node = PullMessagesRequest(); node.node.node_id = NODE
obj = PullObjectRequest(object_id="ab" * 32); obj.node.node_id = NODE
cases = [  # (held pull, the push that must wake it)
    (lambda: F.PullMessages(None, node, active), lambda: r.push_messages(PushAppMessagesRequest(messages_list=[msg]), None, task)),
    (lambda: m.pull_object(obj, None), lambda: r.push_object(PushObjectRequest(object_id="ab" * 32), None, task)),
    (lambda: r.pull_messages(PullAppMessagesRequest(), ours, task), lambda: m.push_messages(PushMessagesRequest(messages_list=[msg]), None)),
    (lambda: r.pull_object(obj, None, task), lambda: m.push_object(PushObjectRequest(object_id="ab" * 32), None)),
]
for pull, push in cases:
    out = {}
    t = threading.Thread(target=lambda: out.update(answer=pull(), took=time.monotonic() - start))
    asked.clear(); start = time.monotonic(); t.start(); assert asked.wait(60); push(); t.join(60)
    answer = out["answer"]
    assert getattr(answer, "messages_list", None) or getattr(answer, "object_available", False), answer
    assert out["took"] < 20, out  # woken by the push, not by the 30 s hold
calls.pop("rt_pull")  # a stock Flower ServerApp's reply pull (another app id) is answered at once: it sleeps 3 s after
stock = SimpleNamespace(get_run_info=lambda run_ids: [SimpleNamespace(fab_id="fedshield/echo-app")])  # our echo test app
start = time.monotonic()
assert not r.pull_messages(PullAppMessagesRequest(), stock, SimpleNamespace(run_id=7)).messages_list
assert time.monotonic() - start < 20 and calls["rt_pull"] == 1
calls["rt_pull"] = 2
print("ok", sorted(calls.items()))
"""


def test_each_push_wakes_the_pull_held_for_it(tmp_path: Path) -> None:
    """In a fresh process, Flower's handlers scripted (empty, then the message or object): each of the four held
    pulls, with node and run ids above 2**63, is answered when the matching push runs, not when its 30 s hold ends.
    Fails if a wake key does not match its wait key (a node id taken from the wrong field, the run id for a node id):
    the node id, the run id and the reply's source node id all differ. A reply pull of a run whose app is not
    fedshield's is not held."""
    out = subprocess.run([sys.executable, "-c", WAKE_CODE], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert out.stdout.startswith("ok"), out.stdout + out.stderr
    assert "('fleet_obj', 2), ('fleet_pull', 2), ('rt_obj', 2), ('rt_pull', 2)" in out.stdout  # each pulled again once


def test_the_installed_superlink_handlers_are_held_and_notify(tmp_path: Path) -> None:
    """In a fresh process (the test process keeps Flower's own handlers): every handler the SuperLink launcher wraps
    is wrapped, idempotently, and still has the arguments the wrappers read. Fails when Flower moves one."""
    code = (
        "from fedshield.flower_internals.held_pulls import hold_empty_pulls, _WRAPPED\n"
        "from flwr.server.superlink.fleet.grpc_rere.fleet_servicer import FleetServicer as F\n"
        "from flwr.server.superlink.fleet.message_handler import message_handler as m\n"
        "from flwr.superlink.servicer.runtime import runtime_handlers as r\n"
        "a = hold_empty_pulls(); assert hold_empty_pulls() == a\n"
        "assert (a[0].max_held, a[1].max_held, a[0].per_caller) == (256, 8, 3), a  # the caps THREAT-MODEL cites\n"
        "for f in (F.PullMessages, m.pull_object, m.push_messages, m.push_object, r.pull_messages, r.pull_object,\n"
        "          r.push_messages, r.push_object):\n"
        "    assert getattr(f, _WRAPPED, False), f\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.stdout.strip() == "ok", out.stdout + out.stderr


def test_a_real_superlink_holds_a_nodes_empty_pull(tmp_path: Path) -> None:
    """A registered node (Flower's own authenticated Fleet client, in this process) pulls from a real fedshield
    SuperLink with nothing queued: the pull is held about PULL_HOLD_S, not answered at once, and answers empty."""
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.client.grpc_rere_client.connection import grpc_request_response
    from flwr.supercore.retry.grpc_retry import make_simple_grpc_retry_invoker

    from fedshield.crypto import init_keys
    from fedshield.deploy import ServerTls, SuperLinkConfig, free_port, start_superlink
    
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
        assert min(took) >= HELD_PULL_S, took  # held, where Flower's own SuperLink answers in milliseconds
    finally:
        superlink.stop()
    assert superlink.process.remaining_pids() == []
