"""Client side of fedshield's SecAgg+: an adapter between our train handler and ``secaggplus_mod``.

fedshield's ``secaggplus_mod`` (:mod:`fedshield.client.secaggplus`, a port of Flower's) masks whatever the
handler below it returns, but it reads the legacy ``FitRes`` layout. This adapter sits inside it::

    @app.train(mods=[secagg_wire_mod, secaggplus_mod, secagg_adapter_mod])

and turns fedshield's reply (``content["arrays"]`` new local weights, ``content["metrics"]`` with
``num-examples``) into that layout, with two privacy choices:

* it sends the update (local minus the global weights received), not the weights: updates are small, so they
  survive clipping to +-``clipping_range`` and use the quantisation levels well;
* only the example count and the privacy-ledger figures travel in clear (:data:`CLEAR_METRICS`); a client's
  training loss or accuracy would leak information about its data, so they are dropped here. The one exception is
  the federated evaluation of the model the message carried, when the server asked for it (``received-*``): the
  test-split figures an evaluate reply sends in clear anyway (outside epsilon, listed in privacy.json's
  ``in_clear``).

A handler that raises, or replies with an error, fails the whole message: the server receives an error reply
carrying the original reason (for example a ``fedshield:budget-exhausted`` refusal).

:func:`secagg_wire_mod` sits outside Flower's mod. When the server asks for it (fedshield's server always does) it
re-encodes the masked vector, which ``secaggplus_mod`` always sends as int64, in the
narrowest unsigned type that holds the field's modulus. Every masked value is below the modulus: lossless.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final, cast

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters
from numpy.typing import NDArray

from ..flower_internals.secagg import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage, recorddict_compat as compat
from ..compression import META, SECAGG_NARROW_KEY, wire_dtype
from ..errors import FedshieldError, ProtocolError
from ..protocol import (
    ARRAYS, EPSILON, METRICS, MIN_HONEST, NUM_EXAMPLES, PARTITION_ID, RECEIVED_ACCURACY, RECEIVED_EXAMPLES,
    RECEIVED_LOSS, ROUNDS_TRAINED, SECAGG_COMPACT, SECAGG_COUNT, SECAGG_METRIC, SKELLAM_FIELD, STEPS,
)

__all__ = ["CLEAR_METRICS", "secagg_adapter_mod", "secagg_wire_mod", "to_fitres_content"]

_log = logging.getLogger(__name__)


#: Reply metrics that may travel in clear next to the masked update: functions of public mechanism settings and
#: of the round count, not of the client's data; and, when the server asked for it (EVALUATE_RECEIVED), the
#: federated evaluation of the model the message carried: the figures an evaluate reply sends in clear anyway
#: (outside epsilon, listed in privacy.json's ``in_clear``).
CLEAR_METRICS: Final = (EPSILON, STEPS, ROUNDS_TRAINED, PARTITION_ID, MIN_HONEST, RECEIVED_EXAMPLES, RECEIVED_LOSS,
                        RECEIVED_ACCURACY)


def secagg_adapter_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """Run the train handler and hand its reply to ``secaggplus_mod`` as an update in the legacy layout."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctx)
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        raise ProtocolError(
            "secagg_adapter_mod got a train message without SecAgg+ settings: register it inside Flower's mod, "
            "@app.train(mods=[secaggplus_mod, secagg_adapter_mod]), and wrap the server strategy in SecAggPlus"
        )
    if ARRAYS not in msg.content.array_records:
        raise ProtocolError(f"the train message has no '{ARRAYS}' ArrayRecord with the global model")
    reply = call_next(msg, ctx)
    if reply.has_error():
        # secaggplus_mod would fail on the missing content and lose the reason; raising keeps it verbatim.
        raise FedshieldError(reply.error.reason or f"the train handler replied with error code {reply.error.code}")
    update, num_examples, clear = _split_reply(msg.content.array_records[ARRAYS], reply.content)
    _warn_if_clipped(update, num_examples, ctx)
    return Message(_fitres_content(update, num_examples, clear), reply_to=msg)


def secagg_wire_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """Send the masked vector in :func:`~fedshield.compression.wire_dtype` of the modulus, and the reply in one
    record (:data:`~fedshield.protocol.SECAGG_COMPACT`), when the server asks."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if msg.metadata.message_type != MessageType.TRAIN or configs is None \
            or configs.get(Key.STAGE) != Stage.COLLECT_MASKED_VECTORS:
        return call_next(msg, ctx)
    narrow, compact = configs.pop(SECAGG_NARROW_KEY, False), configs.pop(SECAGG_COMPACT, False)
    reply = call_next(msg, ctx)
    if reply.has_error() or not (narrow or compact):
        return reply
    rec = reply.content.config_records[RECORD_KEY_CONFIGS]
    if narrow:
        state = ctx.state.config_records[RECORD_KEY_STATE]
        masked = cast(list[bytes], rec[Key.MASKED_PARAMETERS])
        rec[Key.MASKED_PARAMETERS] = _narrow(masked, int(cast(int, state["mod_range"])))
    if compact:
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        rec[SECAGG_COUNT] = int(fitres.num_examples)
        rec.update({SECAGG_METRIC + k: v for k, v in fitres.metrics.items()})
        for name in [name for name in reply.content if name.startswith("fitres.")]:
            del reply.content[name]
    return reply


def _narrow(masked: list[bytes], modulus: int) -> list[bytes]:
    dtype = wire_dtype(modulus)
    out = []
    for raw in masked:
        arr = bytes_to_ndarray(raw)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= modulus):
            # Cannot happen with secaggplus_mod's arithmetic; never truncate a masked value silently.
            raise ProtocolError(f"masked value outside [0, {modulus}): {int(arr.min())}..{int(arr.max())}")
        out.append(ndarray_to_bytes(arr.astype(dtype)))
    return out


def to_fitres_content(global_arrays: ArrayRecord, reply: RecordDict) -> RecordDict:
    """Build the legacy ``fitres`` content: update = local - global (in the global's key order), count, clear metrics.

    Raises ProtocolError if the reply lacks the arrays or the count, or its arrays do not match the global
    model's keys and shapes.
    """
    return _fitres_content(*_split_reply(global_arrays, reply))


def _split_reply(global_arrays: ArrayRecord, reply: RecordDict) -> tuple[list[NDArray[Any]], int, dict[str, Any]]:
    metrics = _reply_metrics(reply)
    if META in _reply_arrays(reply):
        raise ProtocolError(
            "the train handler replied with an update it quantised itself (round config quantize > 0), but under "
            "SecAgg+ the update is quantised into the secure-aggregation field: the server must send quantize 0 "
            "with SecAgg+ (fedshield's SecAggPlus does; update the server)"
        )
    arrays = _reply_arrays(reply)
    # Distributed DP: the one array is the site's Skellam field vector, masked as is (not an update to subtract).
    update = [arrays[SKELLAM_FIELD].numpy()] if SKELLAM_FIELD in arrays else _update(arrays, global_arrays)
    clear = {k: metrics[k] for k in CLEAR_METRICS if k in metrics and _is_scalar(metrics[k])}
    return update, _num_examples(metrics), clear


def _fitres_content(update: list[NDArray[Any]], num_examples: int, clear: dict[str, Any]) -> RecordDict:
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(update),
        num_examples=num_examples,
        metrics=clear,
    )
    return compat.fitres_to_recorddict(fitres, keep_input=False)


def _reply_arrays(reply: RecordDict) -> ArrayRecord:
    if ARRAYS not in reply.array_records:
        raise ProtocolError(f"the train handler's reply has no '{ARRAYS}' ArrayRecord with the new local weights "
                            f"(records: {list(reply.keys())})")
    return reply.array_records[ARRAYS]


def _reply_metrics(reply: RecordDict) -> MetricRecord:
    if METRICS not in reply.metric_records or NUM_EXAMPLES not in reply.metric_records[METRICS]:
        raise ProtocolError(f"the train handler's reply needs a '{METRICS}' MetricRecord holding '{NUM_EXAMPLES}'")
    return reply.metric_records[METRICS]


def _update(local: ArrayRecord, global_arrays: ArrayRecord) -> list[NDArray[Any]]:
    if set(local.keys()) != set(global_arrays.keys()):
        missing = sorted(set(global_arrays.keys()) - set(local.keys()))
        extra = sorted(set(local.keys()) - set(global_arrays.keys()))
        raise ProtocolError(f"local weights do not match the global model: missing {missing}, unexpected {extra}")
    out = []
    for key, g in global_arrays.items():
        g_arr, l_arr = g.numpy(), local[key].numpy()
        if g_arr.shape != l_arr.shape:
            raise ProtocolError(f"array {key!r}: local shape {l_arr.shape} differs from the global {g_arr.shape}")
        # float64 so that integer buffers (e.g. BatchNorm counters) and float32 weights subtract exactly.
        out.append(np.asarray(np.asarray(l_arr, dtype=np.float64) - np.asarray(g_arr, dtype=np.float64)))
    return out


def _num_examples(metrics: MetricRecord) -> int:
    value = metrics[NUM_EXAMPLES]
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0 \
            or value != int(value):
        raise ProtocolError(f"'{NUM_EXAMPLES}' must be a whole number >= 0, got {value!r}")
    return int(value)


def _is_scalar(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _warn_if_clipped(update: list[NDArray[Any]], num_examples: int, ctx: Context) -> None:
    """Warn when secaggplus_mod is about to clip this update: the aggregate would then be silently biased."""
    state = ctx.state.config_records.get(RECORD_KEY_STATE)
    if len(update) == 1 and update[0].dtype == np.int64:  # a Skellam field vector: SecAgg+ does not clip it
        return
    if state is None or "clipping_range" not in state or "max_weight" not in state:
        return
    clip, max_weight = float(state["clipping_range"]), float(state["max_weight"])  # type: ignore[arg-type]
    largest = max((float(np.max(np.abs(a))) for a in update if a.size), default=0.0)
    scaled = largest * num_examples / max_weight
    if scaled > clip:
        _log.warning(
            "SecAgg+ will clip this update: its largest entry %.4g x num-examples %d / max_weight %g = %.4g "
            "exceeds clipping_range %g; lower the learning rate, or raise clipping_range on the server",
            largest, num_examples, max_weight, scaled, clip,
        )
