"""The run's strategy: the named Flower strategy wrapped in fedshield's layers, composed in one place.

Layers, outermost first (each wraps the next):

1. :class:`~fedshield.strategies.recording.RecordingStrategy`: sees the raw replies as they arrive (their sizes)
   and the aggregated metrics and evaluation; folds each round's federated evaluation into the next round's train
   messages unless ``separate_evaluation``.
2. :class:`~fedshield.strategies.secagg.SecAggPlus` (``--secagg``): runs the SecAgg+ stages and hands the layers
   below ONE reply, the unmasked sum. Outside everything that reads an update, since none can be read before it.
3. :class:`~fedshield.strategies.dequantize.DequantizeUpdates` (``--quantize`` without SecAgg+; under SecAgg+ the
   field itself quantizes and replies arrive full): turns each compressed update back into weights, so the layers
   below see what they always see.
4. :class:`~fedshield.strategies.validation.UpdateValidation`: rejects a malformed or out-of-range update with its
   reason. Outside client-level DP, so a rejected update neither counts as a client nor contributes noise.
5. :class:`~fedshield.strategies.client_level_dp.ClientLevelDP` (``--client-dp``): clips, noises and releases the mean
   update as one synthetic reply, so the strategy below applies its optimiser to the private release only.
6. The named strategy (:mod:`~fedshield.strategies.registry`): Flower's own aggregation and server optimiser.

What layers must share about a round goes through one :class:`~fedshield.strategies.outcomes.RoundOutcomes`,
handed to the layers that write it; :class:`StrategyStack` names it, the layers, and those that carry state
between rounds (checkpointed by name), so nobody walks ``.inner`` to find them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import FedAvg, Strategy

from .. import protocol as P
from ..config import RunConfig
from ..errors import ConfigError
from .client_level_dp import ClientLevelDP
from .dequantize import DequantizeUpdates
from .outcomes import RoundOutcomes
from .recording import RecordingStrategy
from .registry import Sampling, build
from .streaming import StreamingFedAvg
from .validation import UpdateValidation

__all__ = ["StrategyStack", "build_strategy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StrategyStack:
    """The run's composed strategy.

    Attributes:
        top: the outermost layer, which ``Strategy.start`` runs.
        outcomes: what the layers learnt about the last round (read after each round).
        layers: every layer, outermost first, ending with the named strategy.
        stateful: the layers whose attributes carry state from round to round (FedAdam's moments, FedAvgM's
            momentum), by the stable name the checkpoint stores them under. Only the named strategy does: the
            wrappers start every round afresh.
    """

    top: RecordingStrategy
    outcomes: RoundOutcomes
    layers: tuple[Strategy, ...]
    stateful: Mapping[str, Strategy]


def build_strategy(config: RunConfig, *, client_noise_multiplier: float | None = None,
                   distributed: Mapping[str, Any] | None = None) -> StrategyStack:
    """The layers of the module docstring for ``config``, sharing one :class:`RoundOutcomes`.

    ``client_noise_multiplier``: client-level DP's z as the run calibrated it (default: the configured one); needed
    when ``config.client_dp`` is on. ``distributed``: under ``--dp-mode distributed``, the arguments of
    :class:`~fedshield.strategies.distributed_dp.DistributedSecAggPlus` (whose masked vectors are Skellam field
    integers) that take SecAgg+'s place.
    """
    outcomes = RoundOutcomes()
    base = build(config.strategy, config.strategy_params, sampling=_sampling(config))
    weight_key = base.weighted_by_key if isinstance(base, FedAvg) else P.NUM_EXAMPLES
    streams = isinstance(base, StreamingFedAvg)
    layers: list[Strategy] = [base]
    if config.client_dp != "off":
        layers.append(_client_dp(config, layers[-1], client_noise_multiplier, weight_key, outcomes))
        streams = True  # ClientLevelDP folds each reply into a running sum
    layers.append(UpdateValidation(layers[-1], max_update_norm=config.max_update_norm, weight_key=weight_key,
                                   streams=streams, outcomes=outcomes, aggregated_replies=config.secagg))
    if config.quantize and not config.secagg:
        layers.append(DequantizeUpdates(layers[-1], streams=streams))
    if config.secagg:
        layers.append(_secagg(config, layers[-1], weight_key, outcomes, distributed))
    if config.client_dp == "distributed" and not config.secagg:
        log.warning("--client-dp distributed without SecAgg+: the server sees each update with only its "
                    "1/sqrt(n) share of the noise; the client-level guarantee holds for the released model only")
    top = RecordingStrategy(layers[-1], outcomes, last_round=config.num_rounds, fold_evaluation=_folds(config))
    return StrategyStack(top, outcomes, (top, *reversed(layers)), {"strategy": base})


def _folds(config: RunConfig) -> bool:
    """Federated evaluation rides in the train messages only when the trainers are the clients it asks: a fixed
    sample of the same share. Otherwise folding would evaluate on fewer clients than asked, or make more sites
    disclose their test figures than the operator chose (``--fraction-evaluate``)."""
    return (not config.separate_evaluation and config.fraction_evaluate > 0 and config.client_sampling == "fixed"
            and config.fraction_evaluate == config.fraction_train)


def _sampling(config: RunConfig) -> Sampling:
    """Node sampling: the strategy samples, except under Poisson client sampling, where ClientLevelDP draws from
    every node the strategy offers."""
    n, poisson = config.num_clients, config.client_sampling == "poisson"
    return Sampling(
        fraction_train=1.0 if poisson else config.fraction_train, fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=n if poisson else config.expected_train_clients,
        min_evaluate_nodes=config.expected_evaluate_clients, min_available_nodes=n,
    )


def _client_dp(
    config: RunConfig, inner: Strategy, z: float | None, weight_key: str, outcomes: RoundOutcomes
) -> ClientLevelDP:
    z = z if z is not None else config.client_noise_multiplier
    if z is None:
        raise ConfigError("client-level DP needs its noise multiplier: calibrate it from --client-epsilon first "
                          "(fedshield.server.plan.client_noise_multiplier_for) or give --client-noise-multiplier")
    return ClientLevelDP(
        inner, mode=config.client_dp, noise_multiplier=float(z), clip_norm=float(config.client_clip_norm or 0.0),
        num_clients=config.num_clients, expected_clients=config.expected_train_clients,
        sampling=config.client_sampling, fraction=config.fraction_train, aggregated_replies=config.secagg,
        min_clients=2 if config.secagg else 1, weight_key=weight_key, outcomes=outcomes,
    )


def _secagg(config: RunConfig, inner: Strategy, weight_key: str, outcomes: RoundOutcomes,
            distributed: Mapping[str, Any] | None) -> Strategy:
    """SecAgg+ as the run configures it. Its key exchange and unmasking stages wait as long for replies as the
    round's train and evaluate exchanges."""
    from .secagg import SecAggPlus

    # Under DP every client weighs the public constant 1 (see client.trainer.reply_metrics), so SecAgg+'s
    # weight scale is 1.
    max_weight: dict[str, Any] = {}
    if config.dp or config.client_dp != "off":
        max_weight = {"max_weight": 1.0}
        if config.quantize == 8:
            # The 8-bit default (+-0.25) was sized for updates scaled by examples/max_weight (230/1000 in the
            # default job); at weight 1 the same updates are 4.3x larger (max 0.48): +-1.0 keeps the 2x
            # headroom, and its step (2/255) still adds only ~0.2% to the entries' variance.
            max_weight["clipping_range"] = 1.0
    if distributed is not None:
        from .distributed_dp import DistributedSecAggPlus

        return DistributedSecAggPlus(inner, timeout=config.round_timeout, weight_key=weight_key, outcomes=outcomes,
                                     **config.secagg_params, **max_weight, **distributed)
    return SecAggPlus(inner, timeout=config.round_timeout, weight_key=weight_key, outcomes=outcomes,
                      **config.secagg_params, **max_weight)
