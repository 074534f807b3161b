"""Canary for every Flower internal fedshield touches (fedshield.flower_internals): after a Flower upgrade, each
test fails naming the internal that moved, instead of a run breaking somewhere downstream.

Unit-level and fast: it reads the installed Flower's modules and sources, starts nothing.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import time
from pathlib import Path

import flwr
import pytest

from fedshield import flower_internals
from fedshield.flower_internals import heartbeat, logs, serverapp, simulation, strategy_state, supernode
from fedshield.protocol import NODE_HEARTBEAT_S

_PACKAGE = Path(flower_internals.__file__).parent
_FLOWER = Path(flwr.__file__).parent


def _flower_imports() -> list[tuple[str, str]]:
    """Every ``from flwr.X import Y`` in fedshield.flower_internals (module level and inside functions)."""
    found = []
    for path in sorted(_PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "flwr":
                found += [(node.module, alias.name) for alias in node.names]
    return found


def _flower_source_has(text: str) -> bool:
    return any(text in p.read_text(encoding="utf-8", errors="replace") for p in _FLOWER.rglob("*.py"))


@pytest.mark.parametrize(("module", "name"), _flower_imports(), ids=lambda v: str(v))
def test_every_flower_name_we_import_still_exists(module: str, name: str) -> None:
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"Flower internal moved: module {module} ({exc}); update fedshield.flower_internals")
    if not hasattr(found, name):
        try:
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            pytest.fail(f"Flower internal moved: {module}.{name} is gone; update fedshield.flower_internals")


def test_the_list_covers_every_flower_module_we_import() -> None:
    listed = " ".join(f"{i.flower} {i.name}" for i in flower_internals.INTERNALS)
    for module, _ in _flower_imports():
        top = ".".join(module.split(".")[:3])
        assert top in listed, f"{module} is imported by fedshield.flower_internals but not listed in INTERNALS"


def test_simulation_dispatch_loop_is_still_the_loop_we_replace() -> None:
    """If Flower changes its engine's dispatch (name, arguments, loop or poll), revisit fedshield.simulation.dispatch."""
    from flwr.server.superlink.fleet.vce import vce_api

    loop = simulation.flower_dispatch_loop
    assert list(inspect.signature(loop).parameters) == ["state", "queue", "nodes_mapping", "f_stop"], (
        "Flower internal moved: vce_api.add_messages_to_queue changed its arguments")
    source = inspect.getsource(loop)
    for needle in ("for node_id in nodes_mapping.keys():", "state.get_message_ins(node_id=node_id, limit=1)",
                   "queue.put(msg)", f"f_stop.wait({simulation.FLOWER_POLL_S})"):
        assert needle in source, f"Flower internal moved: vce_api.add_messages_to_queue no longer does {needle!r}"
    # looked up in the module at call time, so swapping the module attribute takes effect
    assert "target=add_messages_to_queue" in inspect.getsource(vce_api.run_api), (
        "Flower internal moved: vce_api.run_api no longer starts add_messages_to_queue by module lookup")


def test_in_memory_link_state_has_what_the_one_pass_dispatch_reads() -> None:
    cls = simulation.InMemoryLinkState
    for attr in ("_check_stored_messages", "get_message_ins"):
        assert callable(getattr(cls, attr, None)), f"Flower internal moved: InMemoryLinkState.{attr}"
    source = inspect.getsource(cls)
    for attr in ("self.lock", "self.message_ins_store"):
        assert attr in source, f"Flower internal moved: InMemoryLinkState no longer has {attr}"
    assert "delivered_at" in source, "Flower internal moved: message metadata delivered_at"


def test_swap_is_applied_only_when_called() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    original = vce_api.add_messages_to_queue
    assert original is simulation.flower_dispatch_loop  # importing fedshield patched nothing

    def replacement(*args: object) -> None:
        return None

    with simulation.swap_dispatch_loop(replacement):
        assert vce_api.add_messages_to_queue is replacement
    assert vce_api.add_messages_to_queue is original


def test_supernode_loop_still_sleeps_through_the_time_module() -> None:
    loop = importlib.import_module(supernode.SUPERNODE_LOOP)
    assert getattr(loop, "time", None) is time, (
        f"Flower internal moved: {supernode.SUPERNODE_LOOP}.time is not the time module; the SuperNode poll cap "
        "(fedshield.deploy.supernode_main) falls back to Flower's 3 s")
    assert "time.sleep(" in inspect.getsource(loop), f"Flower internal moved: {supernode.SUPERNODE_LOOP} sleeps"


def test_supernode_loop_sleeps_only_for_its_idle_poll_and_its_local_waits() -> None:
    """CappedSleepClock (fedshield.deploy.supernode_main) tells the two apart by length: 3 s is the SuperLink poll,
    0.5 s a wait on the node's own state."""
    source = inspect.getsource(importlib.import_module(supernode.SUPERNODE_LOOP))
    sleeps = sorted(set(re.findall(r"time\.sleep\(([^)]*)\)", source)))
    assert sleeps == ["0.5", "3"], f"Flower internal moved: {supernode.SUPERNODE_LOOP} now sleeps {sleeps}"


def test_superexec_loop_still_sleeps_through_the_time_module_between_task_polls() -> None:
    from flwr.supercore.superexec import run_superexec as loop

    assert loop.time is time, "fedshield.deploy.superexec_wake replaces run_superexec.time: update it"
    assert "time.sleep(task_poll_interval)" in inspect.getsource(loop.run_superexec)
    assert "plugin.launch_task" in inspect.getsource(loop.run_superexec)


def test_the_receiving_step_still_takes_the_calls_the_stop_fix_wraps() -> None:
    """fail_receive_on_stopped_run wraps these arguments of the step; its clean-up is Flower's own except-branch."""
    loop = importlib.import_module(supernode.SUPERNODE_LOOP)
    step = getattr(loop, supernode.RECEIVE_STEP, None)
    assert step is not None, f"Flower internal moved: {supernode.SUPERNODE_LOOP}.{supernode.RECEIVE_STEP}"
    params = set(inspect.signature(step).parameters)
    assert {"pull_object", "confirm_message_received", "state", "receive", "object_store"} <= params, (
        f"Flower internal moved: {params}")
    source = inspect.getsource(step)
    # The node-answer hook (fedshield.deploy.node_stages) claims the task the step creates through its state
    # argument, and reads the message the step stores whole before it returns.
    for needed in ("except Exception", "state.finish_task(", "state.delete_messages(", "except RunNotRunningException",
                   "state.create_task(", "object_store.put(", "receive()"):
        assert needed in source, f"Flower internal moved: {supernode.RECEIVE_STEP} has no {needed!r}"
    from flwr.supercore.run import RunNotRunningException

    # Still the cause: a BaseException skips the clean-up. (If Flower fixes this, the wrap is harmless; drop it.)
    assert not issubclass(RunNotRunningException, Exception)


@pytest.mark.parametrize(("module", "attribute"), [(supernode.SUPERNODE_LOOP, "pull_objects"),
                                                   (supernode.CLIENTAPP_RUNNER, "pull_and_inflate_object_from_tree"),
                                                   (serverapp.HTTP_GRID, "pull_objects")])
def test_the_object_pulls_we_quicken_still_take_their_backoff(module: str, attribute: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    found = importlib.import_module(module)
    pull = getattr(found, attribute, None)
    assert pull is not None and f"{attribute}(" in inspect.getsource(found), f"Flower internal moved: {module}.{attribute}"
    monkeypatch.setattr(found, attribute, pull)  # restored after the test
    assert supernode.quicken_object_pulls(module, attribute, initial_backoff=0.01, backoff_cap=0.1)
    quick = getattr(found, attribute)
    assert quick.func is pull and quick.keywords == {"initial_backoff": 0.01, "backoff_cap": 0.1,
                                                      "max_tries_per_object": None}


@pytest.mark.parametrize("module", ["flwr.superlink.main", "flwr.supernode.main"])
def test_http_api_create_app_is_still_there_to_guard(module: str) -> None:
    assert callable(getattr(importlib.import_module(module), "create_app", None)), (
        f"Flower internal moved: {module}.create_app (fedshield.deploy.same_user guards it)")


@pytest.mark.parametrize("attr", strategy_state.STATE_ATTRS)
def test_strategy_state_attribute_names(attr: str) -> None:
    sources = " ".join(p.read_text(encoding="utf-8") for p in (_FLOWER / "serverapp" / "strategy").glob("*.py"))
    assert f"self.{attr}" in sources, (
        f"Flower internal moved: no Flower strategy keeps self.{attr}; a resumed run would lose that state "
        "(fedshield.server.checkpoint)")


@pytest.mark.parametrize("text", [
    logs.SUPERNODE_CONNECTED.split("(")[0].strip(), logs.ACTIVATION_FAILED, logs.ALREADY_REGISTERED,
    logs.EXIT_CODE.split("(")[0].strip(), "[code: ", "2004", "2001",
])
def test_log_lines_we_look_for_are_still_written_by_flower(text: str) -> None:
    # CERTIFICATE_VERIFY_FAILED / Socket closed / UNAVAILABLE come from gRPC itself; they only refine an
    # explanation (fedshield.deploy.supernode.explain_supernode_failure), which otherwise says "see the log".
    assert _flower_source_has(text), f"Flower internal moved: Flower no longer logs {text!r} (fedshield.flower_internals.logs)"


def test_the_link_hooks_still_find_what_the_event_driven_link_wraps() -> None:
    """If Flower changes how its in-memory state stores messages or how run_simulation builds the ServerApp's grid,
    revisit fedshield.simulation.wake (the hand-offs would silently fall back to fixed ticks, or break)."""
    state_cls, grid_cls = simulation.InMemoryLinkState, simulation.InMemoryGrid
    for method in ("store_message_ins", "store_message_res"):
        assert list(inspect.signature(getattr(state_cls, method)).parameters)[:2] == ["self", "message"], (
            f"Flower internal moved: InMemoryLinkState.{method} changed its arguments")
    for attr in ("push_messages", "pull_messages", "send_and_receive"):
        assert callable(getattr(grid_cls, attr, None)), f"Flower internal moved: InMemoryGrid.{attr} is gone"
    assert simulation.run_simulation_module.InMemoryGrid is grid_cls, (
        "Flower internal moved: run_simulation no longer uses flwr.superlink.grid.InMemoryGrid")
    assert "InMemoryGrid(" in inspect.getsource(simulation.run_simulation_module), (
        "Flower internal moved: run_simulation no longer builds InMemoryGrid by module lookup")
    init = inspect.getsource(grid_cls.__init__)
    assert "self.state" in init and "pull_interval" in init, (
        "Flower internal moved: InMemoryGrid no longer keeps .state and pull_interval")


def test_the_link_hooks_restore_flower_after_the_block() -> None:
    state_cls = simulation.InMemoryLinkState
    before = (state_cls.store_message_ins, state_cls.store_message_res, simulation.run_simulation_module.InMemoryGrid)

    class Grid(simulation.InMemoryGrid):
        pass

    with simulation.swap_link_hooks(wrap_store_ins=lambda f: f, wrap_store_res=lambda f: f, grid_class=Grid):
        assert simulation.run_simulation_module.InMemoryGrid is Grid
    assert (state_cls.store_message_ins, state_cls.store_message_res,
            simulation.run_simulation_module.InMemoryGrid) == before


def test_the_heartbeat_interval_is_still_read_from_the_two_copies_we_set() -> None:
    """The node announces ``connection.HEARTBEAT_DEFAULT_INTERVAL`` and paces itself on ``heartbeat``'s copy; the
    SuperLink expires it after HEARTBEAT_PATIENCE of them (fedshield.flower_internals.heartbeat)."""
    from flwr.common import constant

    for module in (heartbeat.NODE_CONNECTION, heartbeat.HEARTBEAT_SENDER):
        source = inspect.getsource(importlib.import_module(module))
        assert "HEARTBEAT_DEFAULT_INTERVAL" in source.split("import", 1)[1], (
            f"Flower internal moved: {module} no longer reads HEARTBEAT_DEFAULT_INTERVAL")
    assert constant.HEARTBEAT_PATIENCE == 2 and constant.HEARTBEAT_MIN_INTERVAL <= NODE_HEARTBEAT_S, (
        "Flower's heartbeat rules changed: revisit fedshield.protocol.NODE_HEARTBEAT_S and deploy.site's restart wait")


def test_setting_the_heartbeat_sets_both_copies_and_refuses_what_flower_would() -> None:
    modules = [importlib.import_module(m) for m in (heartbeat.NODE_CONNECTION, heartbeat.HEARTBEAT_SENDER)]
    before = [m.HEARTBEAT_DEFAULT_INTERVAL for m in modules]
    try:
        assert heartbeat.set_node_heartbeat_interval(NODE_HEARTBEAT_S)
        assert [m.HEARTBEAT_DEFAULT_INTERVAL for m in modules] == [NODE_HEARTBEAT_S] * 2
    finally:
        for module, value in zip(modules, before):
            module.HEARTBEAT_DEFAULT_INTERVAL = value
    with pytest.raises(ValueError, match=r"heartbeat interval must be in \[10, 1800\]"):
        heartbeat.set_node_heartbeat_interval(5)


def test_the_engine_still_builds_its_backend_through_run_api() -> None:
    """fedshield.simulation.local_backend replaces the Backend that start_vce's backend_fn builds by wrapping
    vce_api.run_api (swap_backend): run_api must still take the factory second and be called by module lookup."""
    from flwr.server.superlink.fleet.vce import vce_api

    params = list(inspect.signature(simulation.flower_run_api).parameters)
    assert params[:2] == ["app_fn", "backend_fn"], f"Flower internal moved: vce_api.run_api takes {params}"
    run_api_source = inspect.getsource(simulation.flower_run_api)
    for needle in ("backend = backend_fn()", "backend.build(app_fn)", "backend.num_workers", "backend.terminate()"):
        assert needle in run_api_source, f"Flower internal moved: vce_api.run_api no longer does {needle!r}"
    start_source = inspect.getsource(vce_api.start_vce)
    assert "run_api(" in start_source and "RayBackend(backend_config)" in start_source, (
        "Flower internal moved: start_vce no longer builds RayBackend and calls run_api")
    abstract = set(simulation.Backend.__abstractmethods__)
    assert abstract == {"build", "is_worker_idle", "terminate", "process_message"}, (
        f"Flower internal moved: Backend's abstract methods are now {sorted(abstract)}")


def test_swap_backend_is_applied_only_inside_the_block() -> None:
    from flwr.server.superlink.fleet.vce import vce_api

    assert vce_api.run_api is simulation.flower_run_api  # importing fedshield patched nothing
    with simulation.swap_backend(lambda: None):  # type: ignore[arg-type,return-value]
        assert vce_api.run_api is not simulation.flower_run_api
    assert vce_api.run_api is simulation.flower_run_api


def test_serde_round_trips_a_message_and_a_context() -> None:
    """The local simulation backend carries every ClientApp call over this serde (the real runs in
    tests/test_sim_backend.py exercise it end to end)."""
    from flwr.app import RecordDict
    from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module

    from fedshield.flower_internals import serde

    proto = ProtoMessage()
    proto.metadata.run_id, proto.metadata.dst_node_id, proto.metadata.message_type = 3, 7, "train"
    proto.content.SetInParent()  # an empty RecordDict: a Message needs content or an error
    msg = serde.decode_message(proto.SerializeToString())
    back = serde.decode_message(serde.encode_message(msg))
    assert (back.metadata.run_id, back.metadata.dst_node_id, back.metadata.message_type) == (3, 7, "train")
    ctx = serde.Context(run_id=3, node_id=7, node_config={"partition-id": 2}, state=RecordDict(),
                        run_config={"k": "v"})
    again = serde.decode_context(serde.encode_context(ctx))
    assert (again.run_id, again.node_id, dict(again.node_config), dict(again.run_config)) == (
        3, 7, {"partition-id": 2}, {"k": "v"})


def test_the_superexec_entry_point_imports_without_the_other_infrastructure_commands() -> None:
    """``flower_internals.superexec.flower_superexec`` skips ``flwr.supercore.cli``'s ``__init__`` (the agent-app,
    connector and model commands): Flower's own function comes back, and SQLAlchemy is never imported."""
    import subprocess
    import sys

    code = ("import sys; from fedshield.flower_internals.superexec import flower_superexec; main = flower_superexec(); "
            "import flwr.supercore.cli.flower_superexec as m; assert main is m.flower_superexec, main; "
            "print(sorted(x for x in ('sqlalchemy', 'flwr.supercore.cli.flwr_agentapp') if x in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_serverapp_quickens_only_flowers_deployment_grid(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a deployed ServerApp (Flower's HttpGrid) gets the short backoff; a simulation's grid is left alone."""
    from flwr.superlink.grid.http_grid import HttpGrid
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    found = importlib.import_module(serverapp.HTTP_GRID)
    monkeypatch.setattr(found, "pull_objects", found.pull_objects)  # restored after the test
    assert not serverapp.quicken_serverapp_pulls(InMemoryGrid.__new__(InMemoryGrid))
    assert not hasattr(found.pull_objects, "keywords")
    assert serverapp.quicken_serverapp_pulls(HttpGrid.__new__(HttpGrid))
    assert found.pull_objects.keywords["initial_backoff"] == 0.02 and found.pull_objects.keywords["backoff_cap"] == 0.25
