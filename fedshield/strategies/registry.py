"""Aggregation strategies by the name users type (``--strategy NAME`` and a ``[strategy]`` table of settings).

Every name maps to Flower's own Message-API implementation (``flwr.serverapp.strategy.*``); ``fedavg`` maps to
:class:`~fedshield.strategies.streaming.StreamingFedAvg`, Flower's FedAvg with an aggregation that folds replies
one at a time (same result to float tolerance). Only the settings listed here can be given: sampling
(``fraction_train``, ``min_*_nodes``) and record keys are fedshield's to set, and an unknown or out-of-range
setting fails at start-up with a :class:`~fedshield.errors.ConfigError` that names it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import Strategy

from ..config import ROBUST_STRATEGIES, STRATEGIES
from ..errors import ConfigError

__all__ = ["ParamSpec", "StrategyEntry", "Sampling", "strategy_names", "get_entry", "validate_params", "build"]


@dataclass(frozen=True)
class ParamSpec:
    """One user-settable constructor argument: its type, the range the maths allows, and a hint."""

    name: str
    kind: type  # int or float
    check: Callable[[float], bool]
    rule: str  # the allowed range, in words, for the error message

    def coerce(self, strategy: str, value: Any) -> int | float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"strategy {strategy!r}: {self.name} must be a number {self.rule}, got {value!r}")
        if self.kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ConfigError(f"strategy {strategy!r}: {self.name} must be a whole number {self.rule}, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if not (math.isfinite(value) and self.check(value)):
            raise ConfigError(f"strategy {strategy!r}: {self.name} must be {self.rule}, got {value!r}")
        return value


@dataclass(frozen=True)
class Sampling:
    """Node sampling that fedshield decides from the run's settings, not the strategy's table."""

    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 2
    min_evaluate_nodes: int = 2
    min_available_nodes: int = 2

    def kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class StrategyEntry:
    name: str
    class_name: str  # in flwr.serverapp.strategy, or "StreamingFedAvg" (ours)
    params: tuple[ParamSpec, ...] = ()
    #: ``(params, clients per round) -> reason`` if too few clients are sampled for the algorithm, else None.
    needs: Callable[[Mapping[str, Any], int], str | None] | None = None

    @property
    def robust(self) -> bool:
        return self.name in ROBUST_STRATEGIES

    def strategy_class(self) -> type[Strategy]:
        if self.class_name == "StreamingFedAvg":
            from .streaming import StreamingFedAvg

            return StreamingFedAvg
        import flwr.serverapp.strategy as flwr_strategies

        cls: type[Strategy] = getattr(flwr_strategies, self.class_name)
        return cls


def _gt0(x: float) -> bool:
    return x > 0


def _ge0(x: float) -> bool:
    return x >= 0


def _unit(x: float) -> bool:
    return 0 <= x < 1


_ETA = ParamSpec("eta", float, _gt0, "> 0 (server learning rate)")
_ETA_L = ParamSpec("eta_l", float, _gt0, "> 0 (recorded by Flower; clients use --lr)")
_TAU = ParamSpec("tau", float, _gt0, "> 0 (adaptivity; e.g. 1e-3)")
_BETA_1 = ParamSpec("beta_1", float, _unit, "in [0, 1) (first-moment decay)")
_BETA_2 = ParamSpec("beta_2", float, _unit, "in [0, 1) (second-moment decay)")
_F = ParamSpec("num_malicious_nodes", int, _ge0, ">= 0 (Byzantine clients to tolerate)")


def _krum_needs(params: Mapping[str, Any], n: int) -> str | None:
    f = int(params.get("num_malicious_nodes", 0))
    if n < 2 * f + 3:
        return f"Krum with num_malicious_nodes={f} needs at least 2f+3 = {2 * f + 3} clients per round, got {n}"
    k = int(params.get("num_nodes_to_select", 1))
    if k > n:
        return f"num_nodes_to_select={k} is more than the {n} clients per round"
    return None


def _bulyan_needs(params: Mapping[str, Any], n: int) -> str | None:
    f = int(params.get("num_malicious_nodes", 0))
    if n < 4 * f + 3:
        return f"Bulyan with num_malicious_nodes={f} needs at least 4f+3 = {4 * f + 3} clients per round, got {n}"
    return None


_ENTRIES: dict[str, StrategyEntry] = {
    e.name: e
    for e in (
        StrategyEntry("fedavg", "StreamingFedAvg"),
        StrategyEntry("fedavgm", "FedAvgM", (
            ParamSpec("server_learning_rate", float, _gt0, "> 0"),
            ParamSpec("server_momentum", float, _unit, "in [0, 1)"),
        )),
        StrategyEntry("fedprox", "FedProx", (ParamSpec("proximal_mu", float, _ge0, ">= 0 (0 is plain FedAvg)"),)),
        StrategyEntry("fedadam", "FedAdam", (_ETA, _ETA_L, _BETA_1, _BETA_2, _TAU)),
        StrategyEntry("fedyogi", "FedYogi", (_ETA, _ETA_L, _BETA_1, _BETA_2, _TAU)),
        StrategyEntry("fedadagrad", "FedAdagrad", (_ETA, _ETA_L, _TAU)),
        StrategyEntry("krum", "Krum", (_F,), _krum_needs),
        StrategyEntry("multikrum", "MultiKrum", (
            _F, ParamSpec("num_nodes_to_select", int, lambda x: x >= 1, ">= 1 (updates averaged after selection)"),
        ), _krum_needs),
        StrategyEntry("bulyan", "Bulyan", (_F,), _bulyan_needs),
        StrategyEntry("fedmedian", "FedMedian"),
        StrategyEntry("fedtrimmedavg", "FedTrimmedAvg", (
            ParamSpec("beta", float, lambda x: 0 <= x < 0.5, "in [0, 0.5) (fraction cut at each end)"),
        )),
    )
}
if tuple(_ENTRIES) != STRATEGIES:  # pragma: no cover - a programming error, caught by the test suite
    raise RuntimeError("fedshield.config.STRATEGIES and the strategy registry disagree")


def strategy_names() -> tuple[str, ...]:
    return tuple(_ENTRIES)


def get_entry(name: str) -> StrategyEntry:
    entry = _ENTRIES.get(name)
    if entry is None:
        raise ConfigError(f"unknown strategy {name!r}: choose one of {', '.join(_ENTRIES)}")
    return entry


def validate_params(name: str, params: Mapping[str, Any], *, clients_per_round: int | None = None) -> dict[str, Any]:
    """Checked constructor keyword arguments for strategy ``name``; ConfigError names any bad setting."""
    entry = get_entry(name)
    specs = {p.name: p for p in entry.params}
    out: dict[str, Any] = {}
    for raw_key, value in params.items():
        key = raw_key.replace("-", "_")
        if key not in specs:
            known = ", ".join(specs) if specs else "none"
            raise ConfigError(
                f"strategy {name!r} has no setting {raw_key!r}: its settings are {known} "
                "(sampling comes from --fraction-train and the number of clients)"
            )
        out[key] = specs[key].coerce(name, value)
    if entry.needs is not None and clients_per_round is not None:
        reason = entry.needs(out, clients_per_round)
        if reason is not None:
            raise ConfigError(f"strategy {name!r}: {reason}: add clients, raise --fraction-train, or lower the setting")
    return out


def build(name: str, params: Mapping[str, Any], *, sampling: Sampling) -> Strategy:
    """Flower's strategy ``name`` with ``params`` (validated) and fedshield's sampling."""
    kwargs = validate_params(name, params, clients_per_round=max(sampling.min_train_nodes, 1))
    cls = get_entry(name).strategy_class()
    try:
        return cls(**sampling.kwargs(), **kwargs)
    except ValueError as exc:  # Flower's own range checks, e.g. FedTrimmedAvg's beta
        raise ConfigError(f"strategy {name!r}: {exc}") from None
