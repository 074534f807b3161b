"""Validated, frozen settings of a federated run.

This is the only module that reads TOML files or Flower's config mappings. Everything downstream receives a
:class:`RunConfig` that has already been checked against the maths (a probability is in (0, 1], epsilon > 0, ...),
so a bad value fails at start-up with a message naming the key and the fix, never mid-run.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = ["PartitionSpec", "RunConfig", "RoundSettings", "load_config_file", "ACCOUNTANTS", "GRAD_SAMPLE_MODES"]

#: Accountants we accept. GDP is deliberately absent: it can under-report epsilon by half.
ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew")
PARTITION_KINDS = ("iid", "dirichlet", "shard")


@dataclass(frozen=True)
class PartitionSpec:
    """How the bundled data set is split across simulated clients: ``iid``, ``dirichlet:ALPHA`` or ``shard:N``."""

    kind: str
    param: float | None = None

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        kind, _, arg = str(text).strip().partition(":")
        kind = kind.lower()
        if kind not in PARTITION_KINDS:
            raise ConfigError(
                f"unknown partition {text!r}: expected one of iid, dirichlet:ALPHA (e.g. dirichlet:0.5), shard:N"
            )
        if kind == "iid":
            if arg:
                raise ConfigError(f"partition 'iid' takes no argument, got {text!r}: use plain 'iid'")
            return cls("iid")
        if not arg:
            example = "dirichlet:0.5" if kind == "dirichlet" else "shard:2"
            raise ConfigError(f"partition {kind!r} needs an argument, got {text!r}: e.g. {example}")
        try:
            value = float(arg)
        except ValueError:
            raise ConfigError(f"partition {text!r}: {arg!r} is not a number") from None
        if kind == "dirichlet" and not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"partition {text!r}: the Dirichlet alpha must be > 0 (smaller = more skewed), got {arg}")
        if kind == "shard" and (value < 1 or value != int(value)):
            raise ConfigError(f"partition {text!r}: shards per client must be a whole number >= 1, got {arg}")
        return cls(kind, value)

    def __str__(self) -> str:
        if self.param is None:
            return self.kind
        value = int(self.param) if self.kind == "shard" else self.param
        return f"{self.kind}:{value:g}"


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a federated run, shared by ``simulate``, ``server`` and ``flwr run``.

    Privacy parameters:
        dp: record-level DP-SGD on every client. Off only on purpose (``--no-dp``), with a warning.
        epsilon: the record-level budget for the whole run. With no ``noise_multiplier`` the noise is calibrated
            once, for all planned rounds x local epochs x steps, so that the last planned round lands on it.
        noise_multiplier: fixes sigma instead; ``epsilon`` (if set) then only caps the budget.
        sample_rate: Poisson sampling probability per DP-SGD step. It must be ``1/k`` for a whole number ``k``
            of steps per local epoch, so that the sampler and the accountant agree exactly.
    """

    task: str = "digits"
    num_clients: int = 5
    num_rounds: int = 20
    partition: PartitionSpec = field(default_factory=lambda: PartitionSpec("iid"))
    dp: bool = True
    epsilon: float | None = 8.0
    delta: float = 1e-5
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    sample_rate: float = 0.5
    local_epochs: int = 2
    lr: float = 2.0
    seed: int = 0
    secagg: bool = True
    fraction_train: float = 1.0
    accountant: str = "prv"
    grad_sample_mode: str = "ghost"
    out: Path = Path("runs/latest")

    def __post_init__(self) -> None:
        _check_int(self.num_clients, "clients", 1)
        _check_int(self.num_rounds, "rounds", 1)
        _check_int(self.local_epochs, "local-epochs", 1)
        if not isinstance(self.partition, PartitionSpec):
            object.__setattr__(self, "partition", PartitionSpec.parse(str(self.partition)))
        if self.epsilon is not None and not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ConfigError(f"epsilon must be a finite number > 0, got {self.epsilon}: e.g. --epsilon 8")
        if not (0 < self.delta < 1):
            raise ConfigError(
                f"delta must be in (0, 1), got {self.delta}: use well below 1/records, e.g. --delta 1e-5"
            )
        if self.noise_multiplier is not None and not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigError(f"noise multiplier must be >= 0, got {self.noise_multiplier}")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigError(f"max-grad-norm must be > 0, got {self.max_grad_norm}: e.g. --max-grad-norm 1.0")
        if self.dp and self.epsilon is None and self.noise_multiplier is None:
            raise ConfigError("DP is on but neither --epsilon nor --noise-multiplier is set: give one, or --no-dp")
        if not (0 < self.lr and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not (0 < self.fraction_train <= 1):
            raise ConfigError(f"fraction-train must be in (0, 1], got {self.fraction_train}")
        if self.secagg and round(self.fraction_train * self.num_clients) < 2:
            raise ConfigError(
                f"secure aggregation needs at least 2 clients per round, got {self.num_clients} client(s) x "
                f"fraction-train {self.fraction_train:g}: add clients, or use --no-secagg (the server then sees the update)"
            )
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"unknown accountant {self.accountant!r}: choose one of {', '.join(ACCOUNTANTS)} "
                "(GDP is not offered: it can under-report epsilon)"
            )
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ConfigError(f"unknown grad-sample-mode {self.grad_sample_mode!r}: choose one of {GRAD_SAMPLE_MODES}")
        object.__setattr__(self, "sample_rate", _normalise_sample_rate(self.sample_rate))
        object.__setattr__(self, "out", Path(self.out))

    @property
    def steps_per_epoch(self) -> int:
        return round(1 / self.sample_rate)

    @property
    def steps_per_round(self) -> int:
        return self.steps_per_epoch * self.local_epochs

    @property
    def planned_steps(self) -> int:
        """DP-SGD steps a client takes if it trains in every planned round: the horizon noise is calibrated for."""
        return self.steps_per_round * self.num_rounds

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], *, base: RunConfig | None = None, zero_is_unset: bool = False
    ) -> RunConfig:
        """Build from a TOML table or Flower run config; keys may use ``-`` or ``_``. Unknown keys are an error.

        ``zero_is_unset``: Flower's run config has no None, so there 0 means "not set" for epsilon and the noise
        multiplier. Everywhere else 0 is a value, and epsilon 0 is rejected.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        aliases = {"clients": "num_clients", "rounds": "num_rounds", "num_supernodes": "num_clients"}
        changes: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = aliases.get(raw_key.replace("-", "_"), raw_key.replace("-", "_"))
            if key not in known:
                raise ConfigError(
                    f"unknown setting {raw_key!r}: known settings are "
                    + ", ".join(sorted(k.replace("_", "-") for k in known))
                )
            changes[key] = _coerce(key, value)
        for key in ("epsilon", "noise_multiplier") if zero_is_unset else ():
            if changes.get(key) == 0:
                changes[key] = None
        return dataclasses.replace(base or cls(), **changes)

    def to_flat_dict(self) -> dict[str, Any]:
        """JSON-able view, written beside every run so it can be reproduced."""
        out = dataclasses.asdict(self)
        out["partition"] = str(self.partition)
        out["out"] = str(self.out)
        return out


def load_config_file(path: Path, *, base: RunConfig | None = None) -> RunConfig:
    """Read ``--config FILE`` (TOML, keys as the CLI flags); the ``[fedshield]`` table if there is one."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: check the path given to --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc}): check its permissions and encoding") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    table = data.get("fedshield", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [fedshield] must be a table of settings")
    return RunConfig.from_mapping(table, base=base)


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def _normalise_sample_rate(q: float) -> float:
    if not (0 < q <= 1):
        raise ConfigError(f"sample-rate must be in (0, 1], got {q}: e.g. 0.25 (4 DP-SGD steps per local epoch)")
    k = round(1 / q)
    if abs(q * k - 1) > 1e-3:
        lo, hi = max(1, math.floor(1 / q)), math.ceil(1 / q)
        raise ConfigError(
            f"sample-rate {q} is not 1/k for a whole number k of steps per local epoch: "
            f"use {1 / hi:.6g} (k={hi}) or {1 / lo:.6g} (k={lo})"
        )
    return 1.0 / k


def _coerce(key: str, value: Any) -> Any:
    if value is None and key in {"epsilon", "noise_multiplier"}:
        return None  # "not set", as written by to_flat_dict (JSON null)
    if key == "out":
        return Path(str(value))
    if key == "partition":
        return PartitionSpec.parse(str(value))
    if key in {"num_clients", "num_rounds", "local_epochs", "seed"}:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key.replace('_', '-')} must be a whole number, got {value!r}")
    if key in {"dp", "secagg"} and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if key in {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "lr", "fraction_train"}:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key.replace('_', '-')} must be a number, got {value!r}")
        return float(value)
    return value


@dataclass(frozen=True)
class RoundSettings:
    """What the server tells every client for one round: the contract both sides of the wire validate.

    The noise multiplier is decided once per run by the server (calibrated for the whole planned horizon), so
    every client runs the same mechanism and one accountant computation describes them all.
    """

    run_id: str
    server_round: int
    num_rounds: int
    task: str
    partition: str
    seed: int
    local_epochs: int
    lr: float
    sample_rate: float
    dp: bool
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float  # 0 = no budget cap from the server
    delta: float
    accountant: str
    grad_sample_mode: str
    sim_state_root: str = ""  # simulation only: where virtual clients keep their ledgers

    def __post_init__(self) -> None:
        if self.dp and not (self.noise_multiplier >= 0 and self.max_grad_norm > 0):
            raise ConfigError(
                f"round config: DP needs noise-multiplier >= 0 and max-grad-norm > 0, "
                f"got {self.noise_multiplier} and {self.max_grad_norm}"
            )
        object.__setattr__(self, "sample_rate", _normalise_sample_rate(self.sample_rate))
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"round config: unknown accountant {self.accountant!r}")
        if not (0 < self.delta < 1):
            raise ConfigError(f"round config: delta must be in (0, 1), got {self.delta}")

    @property
    def steps(self) -> int:
        return round(1 / self.sample_rate) * self.local_epochs

    def to_record_dict(self) -> dict[str, Any]:
        """Flat dict of ConfigRecord-able scalars (keys with '-' as Flower uses them)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_record_dict(cls, record: Mapping[str, Any]) -> RoundSettings:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key not in record:
                if f.default is not dataclasses.MISSING:
                    continue
                raise ConfigError(
                    f"round config is missing {key!r}: server and client run different fedshield versions? "
                    "Install the same version on both sides"
                )
            kwargs[f.name] = record[key]
        for name in ("server_round", "num_rounds", "seed", "local_epochs"):
            kwargs[name] = int(kwargs[name])
        for name in ("lr", "sample_rate", "noise_multiplier", "max_grad_norm", "target_epsilon", "delta"):
            kwargs[name] = float(kwargs[name])
        kwargs["dp"] = bool(kwargs["dp"])
        return cls(**kwargs)
