"""The fedshield ClientApp: what runs next to an institution's data, in simulation and in deployment alike.

Train replies carry the new local weights and the client's ledger figures; a client that would exceed its privacy
budget replies with an error whose reason starts with ``fedshield:budget-exhausted`` instead of training.
Secure aggregation is switched on by the server per round: when a train message carries SecAgg+ settings it goes
through Flower's own ``secaggplus_mod``, which masks the update before it leaves this process.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Array, ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from .. import protocol as P
from ..config import RoundSettings
from ..errors import BudgetExhaustedError, FedshieldError
from .site import DATA_PATH, resolve_site
from .trainer import evaluate_round, train_round

__all__ = ["app"]

#: Error code of a fedshield refusal (Flower's own codes are small integers).
REFUSAL_CODE = 4001
CONFIG_ERROR_CODE = 4002
#: Error code and reason prefix of a deployed client refusing to send its update without SecAgg+.
PLAIN_REFUSED_CODE = 4003
PLAIN_REFUSAL = "fedshield:plain-update-refused"
#: node_config key (``fedshield client --allow-plain-updates``) that lets a deployed client send plain updates.
ALLOW_PLAIN_UPDATES = "allow-plain-updates"


def secagg_when_requested(msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
    """Route a train message through Flower's ``secaggplus_mod`` only when the server asked for SecAgg+."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctx)
    from flwr.client.mod import secaggplus_mod

    from .secagg_mod import secagg_adapter_mod

    return secaggplus_mod(msg, ctx, lambda m, c: secagg_adapter_mod(m, c, call_next))


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


def _settings(msg: Message) -> RoundSettings:
    return RoundSettings.from_record_dict(dict(msg.content[P.CONFIG]))


@app.train(mods=[refuse_plain_updates, secagg_when_requested])
def train(msg: Message, context: Context) -> Message:
    site = None
    try:
        settings = _settings(msg)
        site = resolve_site(context.node_config, settings)
        outcome = train_round(site, settings, msg.content[P.ARRAYS].to_torch_state_dict())
    except BudgetExhaustedError as exc:
        # A simulated client names itself (node ids change across resumes); a deployed one stays anonymous.
        tag = f" [{site.name}]" if site is not None and site.partition_id is not None else ""
        return Message(Error(code=REFUSAL_CODE, reason=f"{P.BUDGET_REFUSAL}{tag}: {exc}"), reply_to=msg)
    except FedshieldError as exc:
        return Message(Error(code=CONFIG_ERROR_CODE, reason=f"fedshield:{type(exc).__name__}: {exc}"), reply_to=msg)
    if outcome.payload is not None:
        arrays = ArrayRecord({k: Array(v) for k, v in outcome.payload.items()})
    else:
        arrays = ArrayRecord(torch_state_dict=outcome.state_dict)
    content = RecordDict({P.ARRAYS: arrays, P.METRICS: MetricRecord(outcome.metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    try:
        settings = _settings(msg)
        site = resolve_site(context.node_config, settings)
        metrics = evaluate_round(site, settings, msg.content[P.ARRAYS].to_torch_state_dict())
    except FedshieldError as exc:
        return Message(Error(code=CONFIG_ERROR_CODE, reason=f"fedshield:{type(exc).__name__}: {exc}"), reply_to=msg)
    return Message(content=RecordDict({P.METRICS: MetricRecord(metrics)}), reply_to=msg)
