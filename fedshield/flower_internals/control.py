"""The SuperLink's Control API, called in this process through Flower's own HTTP client instead of a ``flwr``
process per call: a run's record (what ``flwr list --run-id ID --format json`` prints), the node list (``flwr
supernode list --format json``, plus each node's public key, which the command omits), and node registration and
revocation (``flwr supernode register`` / ``unregister``).

Why: each ``flwr`` command is a new Python process that imports Flower's CLI: ~1.3-1.9 s of CPU per call, taken
from the sites' training on a small machine. A server start registers every site, then checks which are online
every few seconds until round 1; the coordinator checks the run's status all run long. The same requests through
Flower's Control API client cost one HTTPS round trip each. Records are built by the CLI's own code
(``flwr.cli.ls``, ``flwr.cli.supernode.ls``), so they have exactly the keys and values the commands print, and
public keys are read and checked by the CLI's own ``try_load_public_key`` (an EC key on a NIST curve).

Only for SuperLinks without Control-API account authentication (fedshield's have none: Flower 1.39 offers it only
through its enterprise plugins). An import that no longer works raises :class:`ImportError` and the caller falls
back to the ``flwr`` command; an HTTP failure raises what Flower's client raises (``httpx.HTTPError``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .logs import ALREADY_REGISTERED

__all__ = ["list_nodes", "register_node", "run_record", "start_run", "stop_run", "unregister_node"]


@contextmanager
def _pythonpath_on_sys_path() -> Iterator[None]:
    """``$PYTHONPATH``'s entries on ``sys.path`` for the block, as a fresh ``flwr`` process would have them."""
    import importlib
    import os
    import sys

    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
    sys.path[:0] = extra
    importlib.invalidate_caches()
    try:
        yield
    finally:
        for entry in extra:
            if entry in sys.path:
                sys.path.remove(entry)


@contextmanager
def _client(address: str, root_certificates: Path | None) -> Iterator[Any]:
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    client = ControlHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=None if root_certificates is None else Path(root_certificates).read_bytes(),
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )
    try:
        yield client
    finally:
        client.close()


def run_record(address: str, *, root_certificates: Path | None, run_id: int) -> dict[str, Any] | None:
    """The run's record as ``flwr list --run-id`` prints it in JSON; None if the SuperLink has no such run."""
    from flwr.cli.ls import _to_json
    from flwr.cli.run_utils import format_runs
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

    with _client(address, root_certificates) as client:
        reply = client.ListRuns(ListRunsRequest(run_id=run_id))
    runs = json.loads(_to_json(format_runs([run_from_proto(p) for p in reply.run_dict.values()], reply.now)))
    for run in runs.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return dict(run)
    return None


def list_nodes(address: str, *, root_certificates: Path | None) -> list[dict[str, Any]]:
    """Every node as ``flwr supernode list --format json`` prints it (``node-id``, ``status``, ...), each with its
    ``public-key`` (PEM SubjectPublicKeyInfo) added: revocation matches stored nodes to a roster by key."""
    from flwr.cli.supernode.ls import _format_nodes, _to_json
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

    with _client(address, root_certificates) as client:
        reply = client.ListNodes(ListNodesRequest())
    keys = {int(n.node_id): bytes(n.public_key).decode("ascii") for n in reply.nodes_info}
    nodes = json.loads(_to_json(_format_nodes(list(reply.nodes_info), reply.now), verbose=False))["nodes"]
    return [{**node, "public-key": keys.get(int(node["node-id"]), "")} for node in nodes]


def register_node(address: str, *, root_certificates: Path | None, public_key_file: Path, name: str) -> int | None:
    """Register the OpenSSH public key in ``public_key_file``; its node ID, or None if the key is already stored.
    A key that is not an EC key on a NIST curve raises ``ValueError`` (Flower's own check)."""
    import httpx
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611

    key = try_load_public_key(Path(public_key_file))
    with _client(address, root_certificates) as client:
        try:
            reply = client.RegisterNode(RegisterNodeRequest(public_key=key, name=name))
        except httpx.HTTPStatusError as err:
            if ALREADY_REGISTERED in err.response.text:  # the SuperLink's answer to a key registered twice
                return None
            raise
    if not reply.node_id:
        raise ValueError("the SuperLink returned no node ID")
    return int(reply.node_id)


def unregister_node(address: str, *, root_certificates: Path | None, node_id: int) -> None:
    """Revoke a stored node (``flwr supernode unregister``)."""
    from flwr.proto.control_pb2 import UnregisterNodeRequest  # pylint: disable=E0611

    with _client(address, root_certificates) as client:
        client.UnregisterNode(UnregisterNodeRequest(node_id=int(node_id)))


def stop_run(address: str, *, root_certificates: Path | None, run_id: int) -> bool:
    """Stop a run (``flwr stop``); whether the SuperLink says it stopped it."""
    from flwr.proto.control_pb2 import StopRunRequest  # pylint: disable=E0611

    with _client(address, root_certificates) as client:
        return bool(client.StopRun(StopRunRequest(run_id=int(run_id))).success)


def start_run(address: str, *, root_certificates: Path | None, app_dir: Path, run_config_file: Path | None) -> int:
    """``flwr run APP CONNECTION --run-config FILE``: build the app bundle from ``app_dir`` and start a run of it,
    as the command does (same validation, FAB build and request); returns the run ID."""
    import hashlib

    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate
    from flwr.common.config import parse_config_args
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=E0611
    from flwr.supercore.fab import Fab

    app_dir = Path(app_dir).resolve()
    with _pythonpath_on_sys_path():  # `flwr run` checks the app's modules import where it runs: PYTHONPATH counts
        load_and_validate(app_dir / "pyproject.toml")  # raises on an invalid app, as `flwr run` refuses it
    fab_bytes = build_fab_from_disk(app_dir)
    fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
    overrides = parse_config_args([str(run_config_file)] if run_config_file is not None else None)
    request = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(overrides), federation="",
                              app_spec="")
    with _client(address, root_certificates) as client:
        reply = client.StartRun(request)
    if not reply.HasField("run_id"):
        raise ValueError("the SuperLink started no run")
    return int(reply.run_id)
