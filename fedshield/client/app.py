"""The fedshield ClientApp: what runs next to an institution's data, in simulation and in deployment alike.

Train replies carry the new local weights and the client's ledger figures; a client that would exceed its privacy
budget replies with an error whose reason starts with ``fedshield:budget-exhausted`` instead of training.
Secure aggregation is switched on by the server per round: when a train message carries SecAgg+ settings it goes
through Flower's own ``secaggplus_mod``, which masks the update before it leaves this process.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from .. import protocol as P
from ..config import RoundSettings
from ..errors import BudgetExhaustedError, FedshieldError
from .site import resolve_site
from .trainer import evaluate_round, train_round

__all__ = ["app"]

#: Error code of a fedshield refusal (Flower's own codes are small integers).
REFUSAL_CODE = 4001
CONFIG_ERROR_CODE = 4002


def secagg_when_requested(msg: Message, ctx: Context, call_next):  # type: ignore[no-untyped-def]
    """Route a train message through Flower's ``secaggplus_mod`` only when the server asked for SecAgg+."""
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctx)
    from flwr.client.mod import secaggplus_mod

    from .secagg_mod import secagg_adapter_mod

    return secaggplus_mod(msg, ctx, lambda m, c: secagg_adapter_mod(m, c, call_next))


app = ClientApp()


def _settings(msg: Message) -> RoundSettings:
    return RoundSettings.from_record_dict(dict(msg.content[P.CONFIG]))


@app.train(mods=[secagg_when_requested])
def train(msg: Message, context: Context) -> Message:
    try:
        settings = _settings(msg)
        site = resolve_site(context.node_config, settings)
        outcome = train_round(site, settings, msg.content[P.ARRAYS].to_torch_state_dict())
    except BudgetExhaustedError as exc:
        return Message(Error(code=REFUSAL_CODE, reason=f"{P.BUDGET_REFUSAL}: {exc}"), reply_to=msg)
    except FedshieldError as exc:
        return Message(Error(code=CONFIG_ERROR_CODE, reason=f"fedshield:{type(exc).__name__}: {exc}"), reply_to=msg)
    content = RecordDict(
        {P.ARRAYS: ArrayRecord(torch_state_dict=outcome.state_dict), P.METRICS: MetricRecord(outcome.metrics)}
    )
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
