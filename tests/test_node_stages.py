"""A SuperNode answers SecAgg+'s key and unmask stages itself (fedshield.deploy.node_stages), through Flower's real
receiving step wrapped as a fedshield SuperNode wraps it, on Flower's real node state and object store: signed
rounds stay exact weighted averages, a refusal is the same refusal, the SuperExec is never woken for what the node
answers, and everything that is not such a stage of the site's own app is left to a ClientApp, untouched.

Each node is a real ``InMemoryNodeState`` with its ``ObjectStore``. A message goes through Flower's
``_pull_and_store_message`` (with fedshield's wrapper) as if the Fleet API had delivered it: its header and object
tree from ``receive``, its objects from ``pull_object``. When the node did not answer, the message is taken the way
a ClientApp process takes it (claim, activate, Flower's read, the harness ClientApp, the context saved back). The
real-process proof (ClientApps started per message in a deployment) is in tests/test_deploy_e2e.py.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message import remove_content_from_message
from flwr.cli.build import build_fab_from_disk
from flwr.clientapp import ClientApp
from flwr.common.constant import Status, SubStatus
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store.object_store_factory import ObjectStoreFactory
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from flwr.supercore.run import Run
from flwr.supernode.nodestate import NodeStateFactory
from _secagg_harness import MAX_WEIGHT, _LocalGrid, as_numpy, assert_weighted_average, initial_arrays, make_client_app
from test_secagg_auth import _sign_in

from fedshield.client.app import app, is_node_stage
from fedshield.deploy.coordinator import app_dir
from fedshield.deploy.node_stages import NodeStageAnswerer
from fedshield.flower_internals import supernode
from fedshield.flower_internals.node_state import stored_message
from fedshield.protocol import SECAGG_REFUSAL
from fedshield.strategies.secagg import SecAggPlus

pytestmark = pytest.mark.usefixtures("task_identity")

ROOT = Path(__file__).resolve().parents[1]
RUN_ID, SERIES = 1, 5


def _bundle(directory: Path) -> Fab:
    content = build_fab_from_disk(directory)
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


class _Step:
    """Flower's receiving step as a fedshield SuperNode runs it (fail_receive_on_stopped_run with the node-answer
    hook), counting the SuperExec wake-ups it asks for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        loop = importlib.import_module(supernode.SUPERNODE_LOOP)
        monkeypatch.setattr(loop, supernode.RECEIVE_STEP, inspect.unwrap(getattr(loop, supernode.RECEIVE_STEP)))
        self.wakes = 0
        assert supernode.fail_receive_on_stopped_run(self._wake, NodeStageAnswerer())
        self._step = getattr(loop, supernode.RECEIVE_STEP)

    def _wake(self) -> None:
        self.wakes += 1

    def deliver(self, state: Any, store: Any, msg: Message, on_pull: Any = None) -> bool:
        """Receive ``msg`` on the node as the Fleet API would hand it over (``on_pull()`` runs before each object
        is fetched); True if the node answered it itself."""
        msg.metadata.__dict__["_message_id"] = msg.object_id
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
        pending = [(remove_content_from_message(msg), get_object_tree(msg))]

        def pull_object(_run: int, oid: str) -> bytes:
            if on_pull is not None:
                on_pull()
            return contents[oid]

        wakes = self.wakes
        run_id = self._step(state=state, object_store=store, node_config={},
                            receive=lambda: pending.pop() if pending else None, get_run=None, get_fab=None,
                            pull_object=pull_object, confirm_message_received=lambda _run, _mid: None,
                            trusted_entities=None)
        assert run_id == RUN_ID
        return self.wakes == wakes


def _node(bundle: Fab, context: Context) -> tuple[Any, Any]:
    objects = ObjectStoreFactory()
    state, store = NodeStateFactory(objects).state(), objects.store()
    state.set_node_id(context.node_id)
    run = Run.create_empty(RUN_ID)
    run.fab_hash, run.series_id = bundle.hash_str, SERIES
    state.store_run(run)
    state.store_fab(bundle)
    state.set_run_series_context(SERIES, context)
    return state, store


def _clientapp_takes(state: Any, store: Any, message_id: str, app_call: Any) -> Message:
    """What a ClientApp process does with the pending task: PullTaskInput, PullMessages, the app, its reply and
    PushTaskOutput; the message's objects go as its confirmation deletes them."""
    (task,) = state.get_tasks(run_ids=[RUN_ID], statuses=[Status.PENDING])
    assert state.claim_task(task.task_id) and state.activate_task(task.task_id)
    (taken,) = state.get_messages(run_ids=[RUN_ID], is_reply=False, limit=1)
    assert taken.metadata.message_id == message_id
    message = stored_message(store, message_id)
    context = state.get_run_series_context(SERIES)
    reply = app_call(message, context)
    assert state.finish_task(task.task_id, sub_status=SubStatus.COMPLETED, details="")
    state.set_run_series_context(SERIES, context)
    state.delete_messages(message_ids=[message_id])
    store.delete(message_id)
    return reply


def _node_reply(state: Any, store: Any, message_id: str) -> Message:
    """What the SuperNode pushes next: the one reply, whose objects are all stored; both messages then go."""
    (stored,) = state.get_messages(is_reply=True)
    assert stored.metadata.reply_to_message_id == message_id
    reply = stored_message(store, stored.metadata.message_id)
    assert reply is not None, "the reply's objects are not all in the node's store"
    assert store.get(message_id) is None, "the received message's objects must go, as a confirmation deletes them"
    state.delete_messages(message_ids=[stored.metadata.message_id, message_id])
    store.delete(stored.metadata.message_id)
    return reply


class _NodeGrid(_LocalGrid):
    """The in-process grid, each node a real Flower node state behind the real receiving step (module docstring)."""

    def __init__(self, app_: ClientApp, num_nodes: int, bundle: Fab, step: _Step) -> None:
        super().__init__(app_, num_nodes)
        self.step = step
        self.answered: list[tuple[int, str]] = []
        self.by_clientapp: list[tuple[int, str]] = []
        self.nodes = {nid: _node(bundle, self.contexts[nid]) for nid in self.node_ids}

    def _deliver(self, msg: Message) -> Message | None:
        nid = msg.metadata.dst_node_id
        state, store = self.nodes[nid]
        stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        if self.step.deliver(state, store, msg):
            self.answered.append((nid, stage))
            self.contexts[nid] = state.get_run_series_context(SERIES)
            return _node_reply(state, store, msg.metadata.message_id)
        self.by_clientapp.append((nid, stage))

        def harness_app(message: Message, context: Context) -> Message | None:
            self.contexts[nid] = context
            return super(_NodeGrid, self)._deliver(message)

        return _clientapp_takes(state, store, msg.metadata.message_id, harness_app)

    def tasks(self) -> list[Any]:
        return [t for state, _ in self.nodes.values() for t in state.get_tasks()]


def _run(grid: _LocalGrid, num_rounds: int) -> list[dict[str, Any]]:
    n = len(grid.node_ids)
    strategy = SecAggPlus(FedAvg(fraction_evaluate=0.0, min_available_nodes=n), max_weight=MAX_WEIGHT)
    models: list[dict[str, Any]] = []
    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=num_rounds,
                   evaluate_fn=lambda rnd, arrays: models.append(as_numpy(arrays)),
                   train_config=ConfigRecord({"num-rounds": num_rounds}))
    return models


def test_the_node_answers_key_and_unmask_stages_and_rounds_stay_exact(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    step = _Step(monkeypatch)
    grid = _NodeGrid(make_client_app(), 4, _bundle(app_dir()), step)
    _sign_in(grid, tmp_path)
    models = _run(grid, num_rounds=3)
    for rnd in (1, 2, 3):
        assert_weighted_average(models[rnd - 1], models[rnd], [0, 1, 2, 3], rnd)
    # Round 1 runs the key stages; rounds 2 and 3 were prepared one round ahead, inside UNMASK.
    stages = [stage for _, stage in grid.answered]
    assert stages.count(Stage.SETUP) == stages.count(Stage.SHARE_KEYS) == 4 and stages.count(Stage.UNMASK) == 12
    assert [stage for _, stage in grid.by_clientapp] == [Stage.COLLECT_MASKED_VECTORS] * 12, "only training"
    assert step.wakes == 2 * 12, "the SuperExec is woken for the masked-vector requests alone (twice each)"
    assert all(t.status.status == Status.FINISHED and t.status.sub_status == SubStatus.COMPLETED for t in grid.tasks())
    assert len(grid.tasks()) == 12 + 20, "one task per message, none left over"


def test_a_substituted_key_is_refused_by_the_node_as_by_a_clientapp(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    grid = _NodeGrid(make_client_app(), 3, _bundle(app_dir()), _Step(monkeypatch))
    _sign_in(grid, tmp_path)
    victim = grid.node_ids[0]
    real = grid._deliver
    refusals: list[Message | None] = []

    def swap_peer_keys(msg: Message) -> Message | None:
        rec = msg.content.config_records[RECORD_KEY_CONFIGS]
        targeted = rec[Key.STAGE] == Stage.SHARE_KEYS and msg.metadata.dst_node_id == victim
        if targeted:
            for key in [k for k in rec if k.isdigit() and int(k) != victim]:
                fake = [public_key_to_bytes(generate_key_pairs()[1]) for _ in range(2)]
                rec[key] = [*fake, *list(rec[key])[2:]]  # genuine signatures over the server's keys
        reply = real(msg)
        if targeted:
            refusals.append(reply)
        return reply

    grid._deliver = swap_peer_keys  # type: ignore[method-assign]
    strategy = SecAggPlus(FedAvg(fraction_evaluate=0.0, min_available_nodes=3), max_weight=MAX_WEIGHT)
    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=1, evaluate_fn=lambda *_: None)
    (reply,) = refusals
    assert reply is not None and reply.has_error() and reply.error.reason.startswith(SECAGG_REFUSAL)
    assert (victim, Stage.SHARE_KEYS) in grid.answered, "the victim's node itself refused, before any share"
    assert (victim, Stage.COLLECT_MASKED_VECTORS) not in grid.by_clientapp, "and trained nothing"


def _stored_stage(stage: str = Stage.UNMASK, *, arrays: bool = False) -> Message:
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: stage})})
    if arrays:
        content["arrays"] = initial_arrays()
    return Message(content, dst_node_id=11, message_type="train")


def _context() -> Context:
    return Context(run_id=RUN_ID, node_id=11, node_config={}, state=RecordDict(), run_config={})


@pytest.mark.parametrize("case", ["arrays", "no secagg", "foreign bundle", "busy context"])
def test_what_is_not_the_nodes_to_answer_goes_to_a_clientapp_untouched(case: str, monkeypatch: pytest.MonkeyPatch
                                                                         ) -> None:
    step = _Step(monkeypatch)
    bundle = _bundle(ROOT / "tests" / "apps" / "echo_app") if case == "foreign bundle" else _bundle(app_dir())
    state, store = _node(bundle, _context())
    msg = _stored_stage(arrays=case == "arrays")
    if case == "no secagg":
        msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=11, message_type="train")
    if case == "busy context":  # the previous message's ClientApp has not saved its context yet
        busy = state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=bundle.hash_str)
        assert state.claim_task(busy) and state.activate_task(busy)
        monkeypatch.setattr("fedshield.deploy.node_stages.PREVIOUS_TASK_WAIT_S", 0.05)
    assert not step.deliver(state, store, msg)
    assert step.wakes >= 1, "the SuperExec was woken for the ClientApp"
    assert not state.get_messages(is_reply=True), "nothing answered"
    seen: list[Message] = []
    _clientapp_takes(state, store, msg.metadata.message_id, lambda m, c: seen.append(m) or Message(RecordDict(),
                                                                                                  reply_to=m))
    assert seen and seen[0].content.config_records.keys() == msg.content.config_records.keys()
    failed = [t for t in state.get_tasks() if t.status.sub_status == SubStatus.FAILED]
    if case in ("arrays",):
        assert not failed, "a message with arrays is never claimed"
    else:  # claimed on arrival, then handed over: the claim ends, with the reason
        assert [t.status.details for t in failed] == ["fedshield: left to a ClientApp"]


def test_the_superexec_cannot_take_a_node_stage_while_its_objects_arrive(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its idle poll asks for a pending task whenever it likes: here, at every object the node fetches."""
    step = _Step(monkeypatch)
    state, store = _node(_bundle(app_dir()), _context())
    grabbed: list[Any] = []
    assert step.deliver(state, store, _stored_stage(Stage.SETUP),  # what AcquireTask would claim, at each object:
                        on_pull=lambda: grabbed.extend(state.get_tasks(statuses=[Status.PENDING])))
    assert not grabbed, "the task was pending while the message's objects arrived"
    (reply,) = state.get_messages(is_reply=True)  # a SETUP without its parameters: the mods' error, by the node
    error = stored_message(store, reply.metadata.message_id)
    assert error is not None and error.has_error() and error.error.code == 2
    assert step.wakes == 0


def test_a_stage_that_fails_after_its_task_is_taken_still_gets_a_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    """An UNMASK out of order (this node never did SETUP) raises in the mods; a node with no context for the run
    fails before them. Either way the SuperNode's push finds the error reply a ClientApp would send."""
    step = _Step(monkeypatch)
    for lost_context in (False, True):
        state, store = _node(_bundle(app_dir()), _context())
        with pytest.MonkeyPatch.context() as patch:
            if lost_context:
                patch.setattr(state, "get_run_series_context", lambda series: None)
            msg = _stored_stage()
            assert step.deliver(state, store, msg)
        (reply,) = state.get_messages(is_reply=True)
        assert reply.metadata.reply_to_message_id == msg.metadata.message_id
        err = stored_message(store, reply.metadata.message_id)
        assert err is not None and err.has_error() and err.error.code == 2, "ErrorCode.CLIENT_APP_RAISED_EXCEPTION"
        (task,) = state.get_tasks()
        assert (task.status.status, task.status.sub_status) == (Status.FINISHED, SubStatus.FAILED)
        assert store.get(msg.metadata.message_id) is None


def test_a_node_stage_is_read_without_being_consumed_and_the_app_has_no_other_mods() -> None:
    msg = _stored_stage()
    assert is_node_stage(msg) and msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.UNMASK
    assert not is_node_stage(Message(_stored_stage().content, dst_node_id=11, message_type="evaluate"))
    assert not is_node_stage(_stored_stage(Stage.COLLECT_MASKED_VECTORS))
    assert not is_node_stage(_stored_stage(arrays=True))
    # answer_node_stage rebuilds the train handler's mod chain: an app-wide mod would be skipped by it.
    assert app._mods == [], "fedshield's ClientApp grew app-wide mods: answer_node_stage must run them too"


def test_a_long_lived_node_reads_its_roster_again_when_the_file_changes(tmp_path: Path) -> None:
    """A SuperNode answers stages for as long as it runs: removing a compromised peer from the roster (or adding a
    site) takes effect at its next stage, not at its next restart."""
    from fedshield.client.node_config import NODE_KEY, SECAGG_ROSTER
    from fedshield.client.secagg_identity import site_identity
    from fedshield.crypto import make_site_key

    own, _ = make_site_key(tmp_path, name="own")
    peer, _ = make_site_key(tmp_path, name="peer")
    roster = tmp_path / "roster.txt"
    roster.write_text(own.read_text() + peer.read_text())
    config = {SECAGG_ROSTER: str(roster), NODE_KEY: str(tmp_path / "own.key")}
    assert len(site_identity(config).roster) == 2
    roster.write_text(own.read_text())  # the peer is struck off
    assert len(site_identity(config).roster) == 1
    assert site_identity(config).roster is site_identity(config).roster, "an unchanged file is not read again"


def test_a_claim_that_lapsed_while_the_objects_came_is_left_to_whoever_holds_the_task(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects slower than Flower's heartbeat interval (a stalled ServerApp, a network outage): the node's claim
    lapses and the SuperExec takes the task. The node must then neither answer nor hand the task over; the
    SuperExec's ClientApp answers it."""
    import datetime

    from flwr.supercore.corestate import in_memory_corestate as core

    step = _Step(monkeypatch)
    state, store = _node(_bundle(app_dir()), _context())
    msg = _stored_stage(Stage.SETUP)
    superexec: list[str] = []
    real_now = core.now

    def objects_slower_than_the_claim() -> None:
        if not superexec:
            monkeypatch.setattr(core, "now", lambda: real_now() + datetime.timedelta(seconds=120))
            state.get_task_by_token("")  # Flower sweeps lapsed claims on its next token lookup
            (task,) = state.get_tasks(statuses=[Status.PENDING])  # the claim lapsed
            superexec.append(state.claim_task(task.task_id))  # AcquireTask

    assert not step.deliver(state, store, msg, on_pull=objects_slower_than_the_claim)
    assert superexec and superexec[0], "the SuperExec took the lapsed task"
    assert step.wakes == 1, "woken once the step is done, to start its ClientApp"
    (task,) = state.get_tasks()
    assert task.status.status == Status.STARTING and state.get_task_by_token(superexec[0]).task_id == task.task_id
    assert not state.get_messages(is_reply=True), "the node answered nothing"
    (left,) = state.get_messages(run_ids=[RUN_ID], is_reply=False, limit=1)  # there for the SuperExec's ClientApp
    assert left.metadata.message_id == msg.metadata.message_id


def test_a_previous_task_counts_as_running_until_just_after_it_finished() -> None:
    """Flower's task output marks the task finished, then stores its context: a stage read in between would take
    the context from before the previous message."""
    import time

    from fedshield.flower_internals.node_state import NodeTask

    state, store = _node(_bundle(app_dir()), _context())
    previous = state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=state.get_run(RUN_ID).fab_hash)
    ours = state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=state.get_run(RUN_ID).fab_hash)
    assert state.claim_task(previous) and state.activate_task(previous) and state.claim_task(ours)
    task = NodeTask(state, store, RUN_ID, ours)
    assert task.others_running(), "a running ClientApp"
    assert state.finish_task(previous, sub_status=SubStatus.COMPLETED, details="")
    assert task.others_running(margin_s=60.0), "just finished: its context may not be stored yet"
    time.sleep(0.01)
    assert not task.others_running(margin_s=0.005), "finished a while ago"


def test_a_reply_that_cannot_be_stored_at_first_is_stored_as_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """``finish`` itself failing (storing the answer raised): the SuperNode's push still finds a reply."""
    from fedshield.flower_internals import node_state

    step = _Step(monkeypatch)
    state, store = _node(_bundle(app_dir()), _context())
    real, calls = node_state._insert_message, []

    def flaky_insert(reply: Message, *args: Any) -> None:
        calls.append(reply.has_error())
        if len(calls) == 1:
            raise OSError("store full")
        real(reply, *args)

    monkeypatch.setattr(node_state, "_insert_message", flaky_insert)
    msg = _stored_stage()
    assert step.deliver(state, store, msg)
    assert len(calls) == 2 and calls[1], "the second try stores an error reply"
    (reply,) = state.get_messages(is_reply=True)
    error = stored_message(store, reply.metadata.message_id)
    assert error is not None and error.has_error() and "store full" in error.error.reason
