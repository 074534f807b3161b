"""Every place fedshield depends on Flower 1.39 beyond its public API, in one package with one canary test.

Flower's public API (``flwr.app``, ``flwr.serverapp``, ``flwr.clientapp``, ``flwr.common``'s top level,
``flwr.simulation.run_simulation``) is imported where it is used. Everything else we touch -- private modules,
module attributes we swap, attribute names we read off Flower's objects, strings we look for in Flower's logs -- is
reached only through the modules of this package, and listed in :data:`INTERNALS`. ``tests/test_flower_internals.py``
checks each entry against the installed Flower and fails naming the internal when an upgrade moves it.

Nothing here patches anything on import: the swaps (the simulation dispatch loop and link hooks, the SuperNode's
sleeps) and the ``create_app`` guard are applied by a call, and only for as long as the caller asks.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["INTERNALS", "Internal"]


@dataclass(frozen=True)
class Internal:
    """One Flower internal: where it lives in Flower, what fedshield does with it, and what guards it."""

    name: str
    flower: str  # "module:attribute" (or "module" / a log string's emitting module)
    use: str  # the fedshield module that depends on it
    guard: str  # what happens when it moves


#: The list ARCHITECTURE.md prints and the canary test walks.
INTERNALS: tuple[Internal, ...] = (
    Internal("simulation dispatch loop", "flwr.server.superlink.fleet.vce.vce_api:add_messages_to_queue",
             "fedshield.simulation.dispatch (via .simulation.swap_dispatch_loop)",
             "swapped only inside run_simulation; --dispatch flower keeps Flower's loop; canary checks the signature"),
    Internal("in-memory link state", "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState "
             "(lock, message_ins_store, _check_stored_messages); flwr.supercore.date:now", "fedshield.simulation.dispatch",
             "any other state type falls back to Flower's loop; canary checks the attributes"),
    Internal("in-memory link store and grid", "flwr.server.superlink.linkstate.in_memory_linkstate:InMemoryLinkState."
             "store_message_ins / store_message_res; flwr.superlink.grid:InMemoryGrid; "
             "flwr.simulation.run_simulation:InMemoryGrid (looked up when the ServerApp's grid is built)",
             "fedshield.simulation.wake (via .simulation.swap_link_hooks)",
             "wrapped only inside run_simulation, restored after; --dispatch flower keeps Flower's; canary checks "
             "the methods and that run_simulation builds its grid by module lookup"),
    Internal("simulation backend factory", "flwr.server.superlink.fleet.vce.vce_api:run_api (its backend_fn "
             "argument; start_vce builds RayBackend there), flwr.server.superlink.fleet.vce.backend.backend:Backend, "
             "flwr.clientapp.client_app:ClientAppException", "fedshield.simulation.local_backend (via "
             ".simulation.swap_backend)", "swapped only inside run_simulation with --backend local; --backend ray keeps "
             "Flower's; canary checks run_api's arguments, its module lookup and Backend's abstract methods"),
    Internal("message and context serde", "flwr.common.serde:metadata_/error_/array_record_/config_record_/"
             "metric_record_ to_proto and from_proto, context_to_proto / context_from_proto, "
             "flwr.app.message:make_message, flwr.proto.message_pb2:Message, Context, flwr.proto.recorddict_pb2:"
             "RecordDict; flwr.app:ConfigRecord's TypedDict state (_check_key_fn, _check_value_fn, _data) and "
             "Array's (_is_dirty, dtype, shape, stype, data)",
             "fedshield.simulation.local_pool, .local_worker (via .serde); fedshield.wire, fedshield.arrays (via "
             ".records)",
             "canary imports every name and round-trips a Message and a Context; tests/test_serde.py checks the bytes "
             "against Flower's message_to_proto, and .records' objects against Flower's constructors"),
    Internal("SecAgg+ client mod pieces", "flwr.client.mod.secure_aggregation.secaggplus_mod:SecAggPlusState, "
             "check_configs, check_stage", "fedshield.client.secaggplus", "canary imports every name (.secagg)"),
    Internal("SecAgg+ maths and keys", "flwr.common.secure_aggregation.* , flwr.supercore.primitives.asymmetric",
             "fedshield.client.secaggplus, fedshield.strategies._secagg_stages", "canary imports every name (.secagg)"),
    Internal("SecAgg+ record keys", "flwr.common.secure_aggregation.secaggplus_constants:RECORD_KEY_CONFIGS, "
             "RECORD_KEY_STATE, Key, Stage", "client.app, client.secagg_mod, strategies.secagg*",
             "canary imports every name (.secagg_keys)"),
    Internal("FitRes compat", "flwr.compat.common.recorddict_compat", "client.secagg_mod, client.secaggplus, "
             "strategies._secagg_stages", "canary imports it (.secagg)"),
    Internal("SuperNode loop's time", "flwr.supernode.start_client_internal:time", "fedshield.deploy.supernode_main",
             "capped only when called; if the attribute is not the time module it warns and leaves Flower's pace"),
    Internal("SuperNode receiving step", "flwr.supernode.start_client_internal:_pull_and_store_message "
             "(pull_object, confirm_message_received; receive, state, object_store for the node-answer hook); "
             "flwr.supercore.run:RunNotRunningException",
             "fedshield.deploy.supernode_main (via .supernode.fail_receive_on_stopped_run)",
             "wrapped only when called; another signature -> warning, Flower's step unchanged; canary checks the "
             "arguments, the clean-up branch and that the exception still skips it"),
    Internal("SuperNode node state", "flwr.supernode.start_client_internal:_insert_message; NodeState."
             "create_task / get_tasks / claim_task / activate_task / finish_task / get_messages / "
             "record_message_processing_start "
             "/ _end / get_run_series_context / set_run_series_context; ObjectStore.get / get_object_tree / delete; "
             "flwr.supercore.inflatable.inflatable_object:iterate_object_tree, flwr.supercore.inflatable."
             "inflatable_utils:inflate_object_from_contents; flwr.common.constant:ErrorCode, Status, SubStatus; "
             "flwr.supercore.constant:TaskType",
             "fedshield.deploy.node_stages (via .node_state)",
             "used only when a SuperNode answers a SecAgg+ key or unmask stage; any error there -> warning and the "
             "message's ClientApp answers it; tests/test_node_stages.py runs it on Flower's real node state"),
    Internal("object-pull backoff", "flwr.supernode.start_client_internal:pull_objects, "
             "flwr.supernode.runtime.run_clientapp:pull_and_inflate_object_from_tree, "
             "flwr.superlink.grid.http_grid:pull_objects",
             "fedshield.deploy.supernode_main, .site_clientapp, server.app (via .supernode.quicken_object_pulls, "
             ".serverapp.quicken_serverapp_pulls)",
             "replaced by a partial only when called; other parameters -> warning, Flower's 1-10 s backoff"),
    Internal("SuperNode heartbeat interval", "flwr.client.grpc_rere_client.connection:HEARTBEAT_DEFAULT_INTERVAL, "
             "flwr.supercore.heartbeat:HEARTBEAT_DEFAULT_INTERVAL; flwr.common.constant bounds", "fedshield.deploy.supernode_main (via "
             ".heartbeat.set_node_heartbeat_interval)", "both set only when called; either missing -> warning, "
             "Flower's 30 s; canary checks both are numbers"),
    Internal("SuperLink pull and push handlers", "flwr.server.superlink.fleet.grpc_rere.fleet_servicer:FleetServicer."
             "PullMessages; flwr.server.superlink.fleet.message_handler.message_handler:pull_object, push_messages, "
             "push_object; flwr.superlink.servicer.runtime.runtime_handlers:pull_messages, pull_object, "
             "push_messages, push_object", "fedshield.deploy.superlink_main (via .held_pulls.hold_empty_pulls)",
             "wrapped only when called, before the servers are built; a missing handler or argument -> warning, "
             "Flower's immediate answers; tests/test_held_pulls.py installs them in a fresh process"),
    Internal("SQL link state's token sweep", "flwr.server.superlink.linkstate.sql_linkstate:SqlLinkState."
             "get_run_status, _cleanup_expired_task_tokens", "fedshield.deploy.superlink_main (via "
             ".link_state.sweep_expired_tokens_less_often)", "wrapped only when called; either missing -> warning, "
             "Flower's sweep on every read; tests/test_link_state_sweep.py runs it on Flower's real state"),
    Internal("HTTP API create_app", "flwr.superlink.main:create_app, flwr.supernode.main:create_app",
             "fedshield.deploy.same_user", "wrapped when called; missing -> RuntimeError (never an unguarded API)"),
    Internal("strategy state attributes", "flwr.serverapp.strategy FedOpt family / FedAvgM: current_arrays, m_t, "
             "v_t, momentum_vector", "fedshield.server.checkpoint", "canary finds each name in Flower's source"),
    Internal("log lines", "SuperNode 'SuperNode ID: N', '[code: 2004]', 'Public key already in use', 'Exit Code: N'",
             "fedshield.deploy.supernode, .site, .superlink, .process", "canary finds each string in Flower's source"),
    Internal("serverapp helpers", "flwr.serverapp.exception:InconsistentMessageReplies, flwr.supercore:log",
             "strategies.streaming, deploy.site_clientapp", "canary imports every name"),
    Internal("entry points", "flwr.superlink.cli.flower_superlink, flwr.supernode.cli.flower_supernode / "
             "flwr_clientapp", "deploy.superlink_main, supernode_main, clientapp_zygote", "canary imports every name"),
    Internal("SuperExec loop's time", "flwr.supercore.superexec.run_superexec:time, "
             "flwr.supercore.cli.flower_superexec:flower_superexec",
             "fedshield.deploy.superexec_wake (via .superexec.replace_superexec_clock)",
             "replaced only when called; if it is not the time module, a warning and Flower's polling; canary "
             "checks the loop still sleeps through it"),
    Internal("Control API in-process", "flwr.cli.ls:_to_json, flwr.cli.run_utils:format_runs, "
             "flwr.cli.supernode.ls:_format_nodes/_to_json, flwr.cli.supernode.register:try_load_public_key, "
             "flwr.cli.cli_client_interceptor:CliClientHttpInterceptor, flwr.supercore.control:ControlHttpClient, "
             "flwr.supercore.interceptors:RuntimeVersionHttpInterceptor, flwr.common.serde:run_from_proto, "
             "flwr.proto.control_pb2, flwr.cli.build:build_fab_from_disk, flwr.cli.config_utils:load_and_validate, "
             "flwr.common.config:parse_config_args, flwr.common.serde:fab_to_proto/user_config_to_proto, "
             "flwr.supercore.fab:Fab",
             "deploy.flwr_run (run status, start and stop a run), deploy.superlink.SuperLink (register, unregister, "
             "list and stored nodes), via .control",
             "imported when called; an ImportError falls back to the `flwr` command (stored nodes: fails in one "
             "line); canary imports every name"),
)
