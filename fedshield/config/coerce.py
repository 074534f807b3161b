"""Turning loosely typed run settings (TOML, CLI flags, Flower's flat run config) into RunConfig's field types."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .specs import PartitionSpec, StrategyParams

__all__ = ["ZERO_IS_UNSET", "coerce", "nest_strategy_params"]

#: Optional numbers that Flower's run config (which has no None) writes as 0 for "not set".
ZERO_IS_UNSET = (
    "epsilon", "noise_multiplier", "max_update_norm", "client_noise_multiplier", "client_epsilon", "client_clip_norm",
)
_PARAMS_PREFIXES = ("strategy-params.", "strategy_params.")


def nest_strategy_params(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flower flattens nested run-config tables to dotted keys: gather ``strategy-params.NAME`` back into one."""
    out: dict[str, Any] = {}
    nested: dict[str, Any] = {}
    for key, value in values.items():
        prefix = next((p for p in _PARAMS_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            out[key] = value
        else:
            nested[key[len(prefix):]] = value
    if nested:
        given = out.pop("strategy_params", out.pop("strategy-params", {})) or {}
        if not isinstance(given, Mapping):
            raise ConfigError(f"strategy-params must be a table of settings, got {given!r}")
        out["strategy_params"] = {**given, **nested}
    return out


def coerce(key: str, value: Any) -> Any:
    """One run setting from a file, flag or Flower run config, as RunConfig holds it (a clear error if it cannot be)."""
    if value is None and key in {"epsilon", "noise_multiplier"}:
        return None  # "not set", as written by to_flat_dict (JSON null)
    if key == "out":
        return Path(str(value))
    if key == "partition":
        return PartitionSpec.parse(str(value))
    if key == "strategy_params":
        if not isinstance(value, Mapping):
            raise ConfigError(f"strategy-params must be a table of settings (e.g. [strategy] beta = 0.2), got {value!r}")
        return StrategyParams(value)
    if key in {"strategy", "client_dp", "client_sampling", "device", "dispatch", "dp_mode"}:
        if not isinstance(value, str):
            raise ConfigError(f"{key.replace('_', '-')} must be text, got {value!r}")
        return value.strip().lower()
    if value is None and key in ZERO_IS_UNSET:
        return None
    if key in {"num_clients", "num_rounds", "local_epochs", "seed", "quantize", "max_physical_batch_size",
               "ddp_records"}:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key.replace('_', '-')} must be a whole number, got {value!r}")
    if key in {"dp", "secagg", "amp", "separate_evaluation"} and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if key in {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "lr", "fraction_train",
               "fraction_evaluate", "round_timeout", "node_wait_timeout", "min_honest", "secagg_shares", "secagg_threshold",
               *ZERO_IS_UNSET}:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key.replace('_', '-')} must be a number, got {value!r}")
        return float(value)
    return value
