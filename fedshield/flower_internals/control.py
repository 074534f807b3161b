"""A run's record from the SuperLink's Control API, in this process: what ``flwr list --run-id ID --format json``
prints for it, without starting a ``flwr`` process.

Why: the coordinator checks a run's status every few seconds while it goes (``flwr run`` exits 0 even when the
ServerApp failed, so the SuperLink's status is the only truth). Each ``flwr list`` is a new Python process that
imports Flower's CLI: ~1.3 s of CPU per check, taken from the sites' training on a small machine. The same request
through Flower's own Control API client costs one HTTPS round trip. The record is built by the CLI's own code
(``flwr.cli.ls``: ``run_from_proto``, ``format_runs``, ``_to_json``), so it has exactly the keys and values the
command prints. Only for SuperLinks without Control-API account authentication (fedshield's have none: Flower 1.39
offers it only through its enterprise plugins); an import that no longer works raises :class:`ImportError`, and
the caller falls back to the ``flwr`` command.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["run_record"]


def run_record(address: str, *, root_certificates: Path | None, run_id: int) -> dict[str, Any] | None:
    """The run's record as ``flwr list --run-id`` prints it in JSON; None if the SuperLink has no such run.

    Raises :class:`ImportError` when Flower's CLI modules are not as in 1.39, and whatever the HTTP client raises
    when the SuperLink cannot be reached (the caller turns both into its own error or fallback).
    """
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.cli.ls import _to_json
    from flwr.cli.run_utils import format_runs
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    client = ControlHttpClient.from_server_address(
        server_address=address,
        insecure=root_certificates is None,
        root_certificates=None if root_certificates is None else Path(root_certificates).read_bytes(),
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )
    try:
        reply = client.ListRuns(ListRunsRequest(run_id=run_id))
    finally:
        client.close()
    runs = json.loads(_to_json(format_runs([run_from_proto(p) for p in reply.run_dict.values()], reply.now)))
    for run in runs.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return dict(run)
    return None
