"""A SuperNode answers SecAgg+'s key and unmask stages itself (fedshield.deploy.node_stages), on Flower's real node
state and object store: signed rounds stay exact weighted averages, a refusal is the same refusal, and everything
that is not such a stage of the site's own app is left to a ClientApp, untouched.

Each node here is a real ``InMemoryNodeState`` with its ``ObjectStore``; a message is stored as Flower's SuperNode
stores one (a pending task, then the message and all its objects), offered to the answerer, and otherwise taken the
way a ClientApp process takes it (claim, activate, Flower's read of the message, the harness ClientApp, the context
saved back). The real-process proof (ClientApps started per message in a deployment) is in tests/test_deploy_e2e.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.clientapp import ClientApp
from flwr.common.constant import Status, SubStatus
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_object_tree
from flwr.supercore.object_store.object_store_factory import ObjectStoreFactory
from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
from flwr.supercore.run import Run
from flwr.supernode.nodestate import NodeStateFactory
from flwr.supernode.start_client_internal import _insert_message
from _secagg_harness import MAX_WEIGHT, _LocalGrid, as_numpy, assert_weighted_average, initial_arrays, make_client_app
from test_secagg_auth import _sign_in

from fedshield.client.app import is_node_stage
from fedshield.deploy.coordinator import app_dir
from fedshield.deploy.node_stages import NodeStageAnswerer
from fedshield.flower_internals.node_state import stored_message
from fedshield.protocol import SECAGG_REFUSAL
from fedshield.strategies.secagg import SecAggPlus

pytestmark = pytest.mark.usefixtures("task_identity")

ROOT = Path(__file__).resolve().parents[1]
RUN_ID, SERIES = 1, 5


def _bundle(directory: Path) -> Fab:
    content = build_fab_from_disk(directory)
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


class _NodeGrid(_LocalGrid):
    """The in-process grid, each node a real Flower node state (module docstring)."""

    def __init__(self, app: ClientApp, num_nodes: int, bundle: Fab) -> None:
        super().__init__(app, num_nodes)
        self.answerer = NodeStageAnswerer()
        self.answered: list[str] = []
        self.by_clientapp: list[str] = []
        self.tasks: list[Any] = []
        self.nodes: dict[int, tuple[Any, Any]] = {}
        for nid in self.node_ids:
            objects = ObjectStoreFactory()
            state, store = NodeStateFactory(objects).state(), objects.store()
            state.set_node_id(nid)
            run = Run.create_empty(RUN_ID)
            run.fab_hash, run.series_id = bundle.hash_str, SERIES
            state.store_run(run)
            state.store_fab(bundle)
            state.set_run_series_context(SERIES, self.contexts[nid])
            self.nodes[nid] = (state, store)

    def _deliver(self, msg: Message) -> Message | None:
        nid = msg.metadata.dst_node_id
        state, store = self.nodes[nid]
        stage = str(msg.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=state.get_run(RUN_ID).fab_hash)
        _insert_message(msg, state, store)  # as Flower's SuperNode stores a message it received
        message_id = msg.metadata.message_id
        if self.answerer(state, store, RUN_ID, message_id):
            self.answered.append(stage)
            reply = self._take_reply(state, store, message_id)
            self.contexts[nid] = state.get_run_series_context(SERIES)
        else:  # a ClientApp process: PullTaskInput, PullMessages, the app, PushTaskOutput
            self.by_clientapp.append(stage)
            assert state.claim_task(task_id) and state.activate_task(task_id)
            (taken,) = state.get_messages(run_ids=[RUN_ID], is_reply=False, limit=1)
            assert taken.metadata.message_id == message_id
            self.contexts[nid] = state.get_run_series_context(SERIES)
            reply = super()._deliver(msg)
            state.finish_task(task_id, sub_status=SubStatus.COMPLETED, details="")
            state.set_run_series_context(SERIES, self.contexts[nid])
            state.delete_messages(message_ids=[message_id])
            store.delete(message_id)
        self.tasks.append(state.get_tasks(task_ids=[task_id])[0])
        return reply

    @staticmethod
    def _take_reply(state: Any, store: Any, message_id: str) -> Message:
        """What the SuperNode pushes next: the one reply, whose objects are all stored; both messages then go."""
        (stored,) = state.get_messages(is_reply=True)
        assert stored.metadata.reply_to_message_id == message_id
        reply = stored_message(store, stored.metadata.message_id)
        assert reply is not None, "the reply's objects are not all in the node's store"
        assert store.get(message_id) is None, "the received message's objects must go, as a confirmation does"
        state.delete_messages(message_ids=[stored.metadata.message_id, message_id])
        store.delete(stored.metadata.message_id)
        return reply


def _run(grid: _LocalGrid, num_rounds: int) -> list[dict[str, Any]]:
    n = len(grid.node_ids)
    strategy = SecAggPlus(FedAvg(fraction_evaluate=0.0, min_available_nodes=n), max_weight=MAX_WEIGHT)
    models: list[dict[str, Any]] = []
    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=num_rounds,
                   evaluate_fn=lambda rnd, arrays: models.append(as_numpy(arrays)),
                   train_config=ConfigRecord({"num-rounds": num_rounds}))
    return models


def test_the_node_answers_key_and_unmask_stages_and_rounds_stay_exact(tmp_path: Path) -> None:
    grid = _NodeGrid(make_client_app(), 4, _bundle(app_dir()))
    _sign_in(grid, tmp_path)
    models = _run(grid, num_rounds=3)
    for rnd in (1, 2, 3):
        assert_weighted_average(models[rnd - 1], models[rnd], [0, 1, 2, 3], rnd)
    # Round 1 runs the key stages; rounds 2 and 3 were prepared one round ahead, inside UNMASK.
    assert sorted(set(grid.answered)) == [Stage.SETUP, Stage.SHARE_KEYS, Stage.UNMASK]
    assert grid.answered.count(Stage.UNMASK) == 12 and grid.answered.count(Stage.SETUP) == 4
    assert grid.by_clientapp == [Stage.COLLECT_MASKED_VECTORS] * 12, "only training needs a ClientApp"
    assert all(t.status.status == Status.FINISHED and t.status.sub_status == SubStatus.COMPLETED for t in grid.tasks)


def test_a_substituted_key_is_refused_by_the_node_as_by_a_clientapp(tmp_path: Path) -> None:
    grid = _NodeGrid(make_client_app(), 3, _bundle(app_dir()))
    _sign_in(grid, tmp_path)
    victim = grid.node_ids[0]
    real = grid._deliver

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

    refusals: list[Message | None] = []
    grid._deliver = swap_peer_keys  # type: ignore[method-assign]
    strategy = SecAggPlus(FedAvg(fraction_evaluate=0.0, min_available_nodes=3), max_weight=MAX_WEIGHT)
    strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=1, evaluate_fn=lambda *_: None)
    (reply,) = refusals
    assert reply is not None and reply.has_error() and reply.error.reason.startswith(SECAGG_REFUSAL)
    assert Stage.SHARE_KEYS in grid.answered  # the node itself refused, before sending any share


def _node(bundle: Fab) -> tuple[Any, Any, int]:
    objects = ObjectStoreFactory()
    state, store = NodeStateFactory(objects).state(), objects.store()
    state.set_node_id(11)
    run = Run.create_empty(RUN_ID)
    run.fab_hash, run.series_id = bundle.hash_str, SERIES
    state.store_run(run)
    state.store_fab(bundle)
    from flwr.app import Context

    state.set_run_series_context(SERIES, Context(run_id=RUN_ID, node_id=11, node_config={}, state=RecordDict(),
                                                 run_config={}))
    task_id = state.create_task(task_type=TaskType.CLIENT_APP, run_id=RUN_ID, fab_hash=bundle.hash_str)
    return state, store, task_id


def _stored(state: Any, store: Any, content: RecordDict) -> str:
    msg = Message(content, dst_node_id=11, message_type="train")
    msg.metadata.__dict__["_run_id"] = RUN_ID
    _insert_message(msg, state, store)
    return msg.metadata.message_id


def _unmask_content() -> RecordDict:
    return RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.UNMASK})})


@pytest.mark.parametrize("case", ["arrays", "no secagg", "foreign bundle", "claimed"])
def test_what_is_not_the_nodes_to_answer_is_left_untouched_for_a_clientapp(case: str) -> None:
    bundle = _bundle(ROOT / "tests" / "apps" / "echo_app") if case == "foreign bundle" else _bundle(app_dir())
    state, store, task_id = _node(bundle)
    content = _unmask_content()
    if case == "arrays":
        content["arrays"] = initial_arrays()
    if case == "no secagg":
        content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    if case == "claimed":
        assert state.claim_task(task_id)  # the SuperExec was first
    message_id = _stored(state, store, content)
    assert not NodeStageAnswerer()(state, store, RUN_ID, message_id)
    (task,) = state.get_tasks(task_ids=[task_id])
    assert task.status.status == (Status.STARTING if case == "claimed" else Status.PENDING)
    assert not state.get_messages(is_reply=True), "nothing answered"
    (left,) = state.get_messages(run_ids=[RUN_ID], is_reply=False, limit=1)  # still there for its ClientApp
    assert left.metadata.message_id == message_id and store.get(message_id)


def test_a_stage_that_raises_becomes_the_error_reply_a_clientapp_would_send() -> None:
    state, store, task_id = _node(_bundle(app_dir()))
    message_id = _stored(state, store, _unmask_content())  # an UNMASK out of order: this node never did SETUP
    assert NodeStageAnswerer()(state, store, RUN_ID, message_id)
    (reply,) = state.get_messages(is_reply=True)
    assert reply.metadata.reply_to_message_id == message_id
    assert reply.has_error() and reply.error.code == 2, reply.error  # ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    (task,) = state.get_tasks(task_ids=[task_id])
    assert (task.status.status, task.status.sub_status) == (Status.FINISHED, SubStatus.FAILED)


def test_a_node_stage_is_read_without_being_consumed() -> None:
    content = _unmask_content()
    msg = Message(content, dst_node_id=11, message_type="train")
    assert is_node_stage(msg) and content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] == Stage.UNMASK
    msg_eval = Message(_unmask_content(), dst_node_id=11, message_type="evaluate")
    assert not is_node_stage(msg_eval)
    collect = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.COLLECT_MASKED_VECTORS})})
    assert not is_node_stage(Message(collect, dst_node_id=11, message_type="train"))
    assert get_object_tree(msg).object_id == msg.object_id
