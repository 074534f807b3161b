"""One train or evaluate request, from plain inputs (round config, named arrays) to plain outputs.

The same two functions serve a ClientApp that trains in its own process (simulation, or a SuperNode started
without a worker) and the warm worker of ``fedshield client`` (:mod:`fedshield.client.warm_worker`), so both paths
charge the privacy ledger, refuse and fail in exactly the same way. Nothing heavy is imported here at module load:
the per-message ClientApp process imports this module, and only the path that really trains pays for torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import protocol as P
from ..errors import BudgetExhaustedError, FedshieldError
from ..protocol import CONFIG_ERROR_CODE, REFUSAL_CODE, WORKER_ERROR_CODE
from .policy import POLICY_REFUSED_CODE, PolicyRefused, check_request, policy_from_node_config

__all__ = [
    "CONFIG_ERROR_CODE",
    "REFUSAL_CODE",
    "WORKER_ERROR_CODE",
    "Refusal",
    "TrainResult",
    "run_evaluate",
    "run_train",
]

log = logging.getLogger(__name__)



class Refusal(Exception):
    """The client does not contribute this round; ``reason`` goes back to the server as an error reply."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class TrainResult:
    """What a train reply carries: new local weights (or a compressed update) and the reply metrics."""

    arrays: dict[str, np.ndarray]
    metrics: dict[str, float]


def run_train(node_config: Mapping[str, Any], config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> TrainResult:
    """Train one round on this site's data; raise :class:`Refusal` for a budget refusal or a configuration error."""
    from ..protocol import RoundSettings
    from .site import resolve_site
    from .trainer import train_round

    _check_policy(node_config, config, train=True)  # a train request passing the policy passes its evaluate check
    site = None
    received: dict[str, float] = {}
    try:
        settings = RoundSettings.from_record_dict(dict(config))
        site = resolve_site(node_config, settings)
        if config.get(P.EVALUATE_RECEIVED) is True:
            received = _evaluate_received(site, settings, arrays)
        outcome = train_round(site, settings, _tensors(arrays))
    except BudgetExhaustedError as exc:
        # A simulated client names itself (node ids change across resumes); a deployed one stays anonymous.
        tag = f" [{site.name}]" if site is not None and site.partition_id is not None else ""
        if site is not None and site.policy is not None:
            log.warning("refused a train request: %s: %s", P.BUDGET_REFUSAL, exc)
        raise Refusal(REFUSAL_CODE, f"{P.BUDGET_REFUSAL}{tag}: {exc}") from None
    except FedshieldError as exc:
        raise Refusal(CONFIG_ERROR_CODE, f"fedshield:{type(exc).__name__}: {exc}") from None
    if outcome.payload is not None:
        out = {k: np.asarray(v) for k, v in outcome.payload.items()}
    else:
        out = {k: v.detach().cpu().numpy() for k, v in outcome.state_dict.items()}
    return TrainResult(out, {**outcome.metrics, **received})


def _evaluate_received(site: Any, settings: Any, arrays: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The federated evaluation of the model a train message carries, before training changes it: the figures an
    evaluate reply would send, under their own keys (``P.EVALUATE_RECEIVED``). An evaluation that fails (memory,
    a broken test split) is logged and left out: it must not cost the round this site's update."""
    from .trainer import evaluate_round

    try:
        figures = evaluate_round(site, settings, _tensors(arrays))
    except Exception as exc:  # pylint: disable=broad-exception-caught  # the update does not depend on it
        log.warning("the evaluation asked for with this round's model failed, sent without it: %s: %s",
                    type(exc).__name__, exc)
        return {}
    return {P.RECEIVED_EXAMPLES: figures[P.NUM_EXAMPLES], P.RECEIVED_LOSS: figures[P.EVAL_LOSS],
            P.RECEIVED_ACCURACY: figures[P.EVAL_ACCURACY]}


def run_evaluate(
    node_config: Mapping[str, Any], config: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Evaluate the global model on this site's test split; raise :class:`Refusal` for a configuration error."""
    from ..protocol import RoundSettings
    from .site import resolve_site
    from .trainer import evaluate_round

    _check_policy(node_config, config, train=False)
    try:
        settings = RoundSettings.from_record_dict(dict(config))
        site = resolve_site(node_config, settings)
        return dict(evaluate_round(site, settings, _tensors(arrays)))
    except FedshieldError as exc:
        raise Refusal(CONFIG_ERROR_CODE, f"fedshield:{type(exc).__name__}: {exc}") from None


def _check_policy(node_config: Mapping[str, Any], config: Mapping[str, Any], *, train: bool) -> None:
    """The site's own policy, before anything the server named is imported (:mod:`fedshield.client.policy`)."""
    try:
        check_request(policy_from_node_config(node_config), config, train=train)
    except PolicyRefused as refused:
        log.warning("refused a %s request: %s", "train" if train else "evaluate", refused.reason)
        raise Refusal(POLICY_REFUSED_CODE, refused.reason) from None
    except FedshieldError as exc:
        raise Refusal(CONFIG_ERROR_CODE, f"fedshield:{type(exc).__name__}: {exc}") from None


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    import torch

    # A copy: arrays decoded from a message may be read-only views of its buffer.
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}
