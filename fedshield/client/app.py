"""The fedshield ClientApp: what runs next to an institution's data, in simulation and in deployment alike.

Train replies carry the new local weights and the client's ledger figures; a client that would exceed its privacy
budget replies with an error whose reason starts with ``fedshield:budget-exhausted`` instead of training.
Secure aggregation is switched on by the server per round: when a train message carries SecAgg+ settings it goes
through fedshield's port of Flower's ``secaggplus_mod`` (signed keys, CSPRNG masks), which masks the update before
it leaves this process.

In deployment Flower starts this app in a new process for every message, so it is a thin shim: it imports only
Flower, numpy and fedshield's light modules, and when the node config names a warm worker
(:mod:`fedshield.client.warm_worker`, run by ``fedshield client``) the round is trained there, where torch, Opacus and
the site's data are already loaded. Without one (simulation, or a bare SuperNode) it trains in this process.
Both paths run the same code (:mod:`fedshield.client.round_work`) and refuse and fail the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..flower_internals.secagg_keys import RECORD_KEY_CONFIGS, Key, Stage
from .. import protocol as P
from ..errors import ProtocolError
from ..orphan_guard import exit_when_orphaned
from ..arrays import array_record, from_numpy, record_to_numpy
from ..wire import pack_content, unpack_content
from .node_config import ALLOW_PLAIN_UPDATES, DATA_PATH, WORKER_SOCKET
from .round_work import CONFIG_ERROR_CODE, REFUSAL_CODE, WORKER_ERROR_CODE, Refusal, TrainResult

__all__ = [
    "ALLOW_PLAIN_UPDATES",
    "CONFIG_ERROR_CODE",
    "PLAIN_REFUSAL",
    "PLAIN_REFUSED_CODE",
    "REFUSAL_CODE",
    "WORKER_ERROR_CODE",
    "NODE_STAGES",
    "answer_node_stage",
    "app",
    "is_node_stage",
    "packed_wire",
    "refuse_plain_updates",
    "secagg_when_requested",
]

PLAIN_REFUSED_CODE = P.PLAIN_REFUSED_CODE
PLAIN_REFUSAL = P.PLAIN_UPDATE_REFUSAL


def secagg_when_requested(msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
    """Route a train message through fedshield's ``secaggplus_mod`` only when the server asked for SecAgg+.

    Around it, ``secagg_wire_mod`` narrows the masked vector's integer type when the server asks for it.
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctx)
    from .secagg_mod import secagg_adapter_mod, secagg_wire_mod
    from .secaggplus import secaggplus_mod  # fedshield's port: signed keys, roster check, ChaCha20 masks

    return secagg_wire_mod(
        msg, ctx, lambda m, c: secaggplus_mod(m, c, lambda m2, c2: secagg_adapter_mod(m2, c2, call_next))
    )


def exit_with_parent(msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
    """Outermost mod: this process ends itself if its SuperNode dies (:mod:`fedshield.orphan_guard`), whatever
    stage the message is in; started here because a ClientApp process exists for its messages."""
    exit_when_orphaned()
    return call_next(msg, ctx)


def packed_wire(msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
    """The model's arrays arrive packed into one object and the reply leaves packed the same way
    (:mod:`fedshield.wire`: one request per hop instead of two per tensor); a message that came unpacked gets an
    unpacked reply. A malformed packed message (version skew, a hostile server) is refused, with the reason."""
    try:
        content, packed = unpack_content(msg.content)
    except ProtocolError as error:
        return Message(Error(code=CONFIG_ERROR_CODE, reason=f"fedshield:ProtocolError: {error}"), reply_to=msg)
    if not packed:
        return call_next(msg, ctx)
    msg.content = content
    reply = call_next(msg, ctx)
    if reply.has_content():
        reply.content = pack_content(reply.content)
    return reply


def refuse_plain_updates(msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
    """A deployed client sends its update only masked by SecAgg+, unless its operator allowed plain updates.

    Why: the server decides per round whether to run SecAgg+. Without this guard a compromised or misconfigured
    server could simply stop asking for it (a downgrade) and read every site's update in clear. The refusal is an
    error reply the server logs and reports, not a crash. Simulated clients (no ``data-path``) are unaffected.
    """
    masked = RECORD_KEY_CONFIGS in msg.content.config_records
    if masked or not str(ctx.node_config.get(DATA_PATH, "")) or _allows_plain(ctx.node_config):
        return call_next(msg, ctx)
    reason = (
        f"{PLAIN_REFUSAL}: the server asked for this site's model update without secure aggregation (SecAgg+), "
        "and this client sends updates only masked. Run the server without --no-secagg; or, if this site accepts "
        "that the server sees its update in clear, restart the client with --allow-plain-updates "
        f"(node config {ALLOW_PLAIN_UPDATES}=true)."
    )
    return Message(Error(code=PLAIN_REFUSED_CODE, reason=reason), reply_to=msg)


def _allows_plain(node_config: Mapping[str, object]) -> bool:
    value = node_config.get(ALLOW_PLAIN_UPDATES, False)
    return value is True or str(value).strip().lower() in ("true", "1", "yes")


app = ClientApp()


def _request(msg: Message) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config = dict(msg.content[P.CONFIG])
    arrays = record_to_numpy(msg.content[P.ARRAYS])
    return config, arrays


def _worker(context: Context) -> str:
    return str(context.node_config.get(WORKER_SOCKET, "") or "")


def _train(context: Context, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> TrainResult:
    if socket_path := _worker(context):
        from .warm_worker_wire import request_train

        return request_train(socket_path, config, arrays)
    from .round_work import run_train

    return run_train(context.node_config, config, arrays)


def _evaluate(context: Context, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, float]:
    if socket_path := _worker(context):
        from .warm_worker_wire import request_evaluate

        return request_evaluate(socket_path, config, arrays)
    from .round_work import run_evaluate

    return run_evaluate(context.node_config, config, arrays)


#: The mods of a train message after ``exit_with_parent``, outermost first.
_TRAIN_MODS = (packed_wire, refuse_plain_updates, secagg_when_requested)
#: SecAgg+ stages that ``secaggplus_mod`` answers by itself: they never reach training, so a SuperNode can answer
#: them without a ClientApp process (:mod:`fedshield.deploy.node_stages`).
NODE_STAGES = frozenset({Stage.SETUP, Stage.SHARE_KEYS, Stage.UNMASK})


def is_node_stage(msg: Message) -> bool:
    """A train message carrying one of :data:`NODE_STAGES` and no arrays (read, not consumed)."""
    if msg.metadata.message_type != "train" or msg.has_error() or msg.content.array_records:
        return False
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return configs is not None and configs.get(Key.STAGE) in NODE_STAGES


def answer_node_stage(msg: Message, context: Context) -> Message:
    """Answer a :func:`is_node_stage` message with the very mods ``train`` runs (less ``exit_with_parent``, which
    only a ClientApp process needs); training is never reached for these stages, and reaching it is an error."""

    def no_training(m: Message, c: Context) -> Message:
        raise ProtocolError("a SecAgg+ key or unmask stage reached training; answer it in a ClientApp")

    call = no_training
    for mod in reversed(_TRAIN_MODS):
        call = (lambda mod, inner: lambda m, c: mod(m, c, inner))(mod, call)
    return call(msg, context)


@app.train(mods=[exit_with_parent, *_TRAIN_MODS])
def train(msg: Message, context: Context) -> Message:
    try:
        result = _train(context, *_request(msg))
    except Refusal as refusal:
        return Message(Error(code=refusal.code, reason=refusal.reason), reply_to=msg)
    arrays = array_record({k: from_numpy(np.ascontiguousarray(v)) for k, v in result.arrays.items()})
    content = RecordDict({P.ARRAYS: arrays, P.METRICS: MetricRecord(result.metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate(mods=[exit_with_parent, packed_wire])
def evaluate(msg: Message, context: Context) -> Message:
    try:
        metrics = _evaluate(context, *_request(msg))
    except Refusal as refusal:
        return Message(Error(code=refusal.code, reason=refusal.reason), reply_to=msg)
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
