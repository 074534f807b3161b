"""Validated, frozen settings of a federated run.

This is the only module that reads TOML files or Flower's config mappings. Everything downstream receives a
:class:`RunConfig` that has already been checked against the maths (a probability is in (0, 1], epsilon > 0, ...),
so a bad value fails at start-up with a message naming the key and the fix, never mid-run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

__all__ = [
    "PartitionSpec", "RunConfig", "RoundSettings", "StrategyParams", "load_config_file", "ACCOUNTANTS",
    "GRAD_SAMPLE_MODES", "STRATEGIES", "ROBUST_STRATEGIES", "CLIENT_DP_MODES", "CLIENT_SAMPLING",
    "AMP_GRAD_SAMPLE_MODES", "normalise_device_spec",
]

#: Accountants we accept. GDP is deliberately absent: it can under-report epsilon by half.
ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("hooks", "ghost", "functorch", "ew")
PARTITION_KINDS = ("iid", "dirichlet", "shard")
#: Aggregation strategies users can name (``--strategy``); :mod:`fedshield.strategies.registry` builds them.
STRATEGIES = (
    "fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
    "krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg",
)
#: Byzantine-robust aggregators: they need every client's individual update, which SecAgg+ hides by design.
ROBUST_STRATEGIES = ("krum", "multikrum", "bulyan", "fedmedian", "fedtrimmedavg")
#: Client-level DP: the server clips and noises individual updates (central), or every client clips its own
#: update and adds its share of the noise (distributed, works under SecAgg+).
CLIENT_DP_MODES = ("off", "central", "distributed")
#: How clients are sampled each round under client-level DP: a fixed number (Flower's sampling, accounted with
#: no amplification), or each client independently with probability fraction-train (amplified).
CLIENT_SAMPLING = ("fixed", "poisson")
#: Opacus grad-sample modes that keep the clipping bound under bf16 autocast (``--amp``): they clip the very
#: per-example gradients they measure (fedshield casts them to fp32 first). Ghost clipping measures norms in bf16
#: and clips in a separate pass (clipped norms measured up to 0.8% above the bound); ew does not support autocast.
AMP_GRAD_SAMPLE_MODES = ("hooks", "functorch")
_DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_StrategyValue = bool | int | float | str


class StrategyParams(Mapping[str, _StrategyValue]):
    """Read-only, hashable ``name -> scalar`` settings of the aggregation strategy (a ``[strategy]`` TOML table).

    Immutable so a frozen :class:`RunConfig` really is frozen; the names and ranges are checked against the
    chosen strategy by :func:`fedshield.strategies.registry.validate_params`.
    """

    __slots__ = ("_items",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        items: dict[str, _StrategyValue] = {}
        for raw_key, value in dict(values or {}).items():
            if not isinstance(raw_key, str) or not raw_key:
                raise ConfigError(f"strategy settings need text names, got {raw_key!r}")
            if not isinstance(value, (bool, int, float, str)):
                raise ConfigError(
                    f"strategy setting {raw_key!r} must be a number, true/false or text, got {type(value).__name__} "
                    f"{value!r}: write it as e.g. `{raw_key.replace('-', '_')} = 0.1` under [strategy]"
                )
            items[raw_key.replace("-", "_")] = value
        object.__setattr__(self, "_items", dict(sorted(items.items())))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("StrategyParams is read-only")

    def __getitem__(self, key: str) -> _StrategyValue:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return f"StrategyParams({self._items!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (StrategyParams, (dict(self._items),))

    def to_dict(self) -> dict[str, _StrategyValue]:
        return dict(self._items)


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

    Aggregation:
        strategy: one of :data:`STRATEGIES` (Flower's own implementations); ``strategy_params`` holds its
            settings (the ``[strategy]`` table of ``--config``). Robust aggregators need ``secagg=False``.
        max_update_norm: reject (never aggregate) a client update whose L2 norm exceeds this bound; needs the
            server to see updates, so not with SecAgg+.

    Client-level DP (protects whether a whole client took part, over the whole run):
        client_dp: ``off``, ``central`` (the server clips and noises individual updates; not with SecAgg+) or
            ``distributed`` (each client clips its update to ``client_clip_norm`` and adds its share of noise).
        client_noise_multiplier: z; the noise on the sum of clipped updates has std ``z * client_clip_norm``.
        client_epsilon: calibrate z instead, for ``num_rounds`` rounds at ``delta``.
        client_sampling: ``fixed`` (Flower's fixed-size sampling, accounted with sample rate 1 under zero-out
            adjacency) or ``poisson`` (each client joins a round with probability ``fraction_train``; amplified
            add/remove accounting; central mode only, since distributed noise shares reveal the count).

    Secure aggregation (SecAgg+, with ``secagg``):
        secagg_shares: how many of a round's clients (the node itself included) hold shares of each client's
            secrets and mask with it: 1.0 (a fraction: all of them, the complete graph, Flower's default) or a
            count >= 3. SecAgg+'s sparse graph (a count of order log n) cuts each client's masking work from
            O(n) to O(log n) masks; fewer neighbours also tolerate fewer dropouts and colluders.
        secagg_threshold: shares needed to rebuild a secret: a fraction of ``secagg_shares`` in (0, 1] (default
            0.66; above 0.5, so a server that lies about dropouts cannot rebuild both secrets of a node) or a
            count >= 2.

    Hardware (none of these changes the privacy mechanism or its accounting):
        device: where clients train: ``auto`` (a CUDA GPU if the client has one, else its CPU), ``cpu``,
            ``cuda`` or ``cuda:N``. A deployed site's node config key ``device`` overrides it.
        max_physical_batch_size: cap on the examples per forward/backward pass of DP-SGD (0: no cap). A larger
            Poisson batch is split and its clipped gradients summed before the one noisy step, so memory is
            bounded while the logical steps, and so epsilon, stay the same.
        amp: bf16 autocast for the forward pass (GPU memory and speed); only with a grad-sample mode in
            :data:`AMP_GRAD_SAMPLE_MODES`, the ones that keep the clipping bound under bf16.

    Reliability:
        round_timeout: seconds the server waits for the replies of each exchange of a round (train, evaluate, and
            each SecAgg+ stage); a client that has not answered by then is left out of that round and reported
            as failed, and the round goes on with the others. Always finite: one hung site must not stall a run.
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
    fraction_evaluate: float = 1.0
    accountant: str = "prv"
    grad_sample_mode: str = "ghost"
    quantize: int = 0
    secagg_shares: float = 1.0
    secagg_threshold: float = 0.66
    out: Path = Path("runs/latest")
    strategy: str = "fedavg"
    strategy_params: StrategyParams = field(default_factory=StrategyParams)
    max_update_norm: float | None = None
    client_dp: str = "off"
    client_noise_multiplier: float | None = None
    client_epsilon: float | None = None
    client_clip_norm: float | None = None
    client_sampling: str = "fixed"
    device: str = "auto"
    max_physical_batch_size: int = 0
    amp: bool = False
    round_timeout: float = 600.0
    data: str = ""  # simulate: a data file partitioned among the virtual clients instead of the bundled data
    text_column: str = ""  # with data: the text column of a text task's table (default "text")
    label_column: str = ""  # with data: the label column (default "label")

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
        if not (0 <= self.fraction_evaluate <= 1):
            raise ConfigError(
                f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate}: the share of clients that evaluate "
                "the global model on their own data each round (0: server-side evaluation only)"
            )
        _check_count_or_fraction(self.secagg_shares, "secagg-shares", min_count=3, example="1.0 (all) or 5")
        _check_count_or_fraction(self.secagg_threshold, "secagg-threshold", min_count=2, example="0.66 or 3")
        if self.secagg_shares > 1 and self.secagg_threshold > self.secagg_shares:
            raise ConfigError(f"secagg-threshold {self.secagg_threshold:g} is above secagg-shares "
                              f"{self.secagg_shares:g}: a secret could never be rebuilt; lower the threshold")
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
        if self.quantize not in (0, 8, 16):
            raise ConfigError(f"quantize must be 8 or 16 (bits per value), or 0 for off, got {self.quantize}")
        if self.quantize == 8 and self.secagg and self.client_dp == "distributed":
            # Each client's noise share would be clipped entry by entry before the shares are summed.
            raise ConfigError(
                "--quantize 8 under SecAgg+ clips every update entry at +-0.25 before masking, far inside the noise "
                "share each client adds for --client-dp distributed, so the summed noise would no longer be the "
                "Gaussian the client-level guarantee is computed for: use --quantize 16, or drop --quantize"
            )
        object.__setattr__(self, "sample_rate", _normalise_sample_rate(self.sample_rate))
        object.__setattr__(self, "out", Path(self.out))
        if not isinstance(self.strategy_params, StrategyParams):
            object.__setattr__(self, "strategy_params", StrategyParams(self.strategy_params))
        self._check_aggregation()
        self._check_client_dp()
        object.__setattr__(self, "device", normalise_device_spec(self.device))
        _check_hardware(self.max_physical_batch_size, self.amp, self.grad_sample_mode, "")
        timeout = self.round_timeout
        if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(
                f"round-timeout must be a finite number of seconds > 0, got {self.round_timeout!r}: e.g. "
                "--round-timeout 600 (longer than the slowest site's round)"
            )
        object.__setattr__(self, "round_timeout", float(timeout))

    def _check_aggregation(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.secagg and self.strategy in ROBUST_STRATEGIES:
            raise ConfigError(
                f"strategy {self.strategy!r} needs every client's individual update, which secure aggregation "
                "(SecAgg+) hides from the server by design: add --no-secagg to use it (the server then sees each "
                "update), or keep SecAgg+ with an averaging strategy (fedavg, fedavgm, fedprox, fedadam, fedyogi, "
                "fedadagrad)"
            )
        if self.max_update_norm is not None:
            if not (self.max_update_norm > 0 and math.isfinite(self.max_update_norm)):
                raise ConfigError(f"max-update-norm must be a finite number > 0, got {self.max_update_norm}")
            if self.secagg:
                raise ConfigError(
                    "max-update-norm checks each client's update, which secure aggregation (SecAgg+) hides from "
                    "the server: drop it (SecAgg+ already clips every entry to +-8; --client-dp distributed "
                    "clips each update on the client), or add --no-secagg"
                )

    def _check_client_dp(self) -> None:
        if self.client_dp not in CLIENT_DP_MODES:
            raise ConfigError(f"unknown client-dp mode {self.client_dp!r}: choose one of {', '.join(CLIENT_DP_MODES)}")
        if self.client_sampling not in CLIENT_SAMPLING:
            raise ConfigError(
                f"unknown client-sampling {self.client_sampling!r}: choose one of {', '.join(CLIENT_SAMPLING)}"
            )
        for name in ("client_noise_multiplier", "client_epsilon", "client_clip_norm"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{name.replace('_', '-')} must be a finite number > 0, got {value}")
        if self.client_dp == "off":
            given = [n for n in ("client_noise_multiplier", "client_epsilon", "client_clip_norm") if getattr(self, n) is not None]
            if given or self.client_sampling != "fixed":
                extra = given or ["client-sampling"]
                raise ConfigError(
                    f"{', '.join(n.replace('_', '-') for n in extra)} set but client-level DP is off: "
                    "add --client-dp central or --client-dp distributed, or drop them"
                )
            return
        if self.client_clip_norm is None:
            raise ConfigError(
                f"client-dp {self.client_dp} needs --client-clip-norm C, the bound on each client's update norm "
                "(e.g. the median update norm of a run without client-level DP)"
            )
        if (self.client_noise_multiplier is None) == (self.client_epsilon is None):
            raise ConfigError(
                f"client-dp {self.client_dp} needs exactly one of --client-noise-multiplier (fix z) or "
                "--client-epsilon (calibrate z for the planned rounds)"
                + ("; both were given" if self.client_noise_multiplier is not None else "")
            )
        if self.strategy in ROBUST_STRATEGIES:
            raise ConfigError(
                f"client-level DP bounds the noisy SUM of clipped updates; {self.strategy!r} does not average, so "
                "the guarantee would not hold: use fedavg, fedavgm, fedprox, fedadam, fedyogi or fedadagrad"
            )
        if self.client_dp == "distributed" and self.client_sampling == "poisson":
            raise ConfigError(
                "client-dp distributed with client-sampling poisson: the summed noise's variance reveals how many "
                "clients took part, which the Poisson (add/remove) accounting assumes hidden: use --client-sampling "
                "fixed (zero-out adjacency), or --client-dp central --no-secagg for Poisson sampling"
            )
        if self.client_dp == "central" and self.secagg:
            raise ConfigError(
                "client-dp central means the server clips every client's update, which secure aggregation "
                "(SecAgg+) hides: use --client-dp distributed (clients clip and add noise shares; works with "
                "SecAgg+), or add --no-secagg"
            )

    @property
    def expected_train_clients(self) -> int:
        """Clients expected in a training round: the fixed sample size, or the Poisson mean (rounded, >= 1)."""
        return max(1, round(self.fraction_train * self.num_clients))

    @property
    def secagg_params(self) -> dict[str, int | float]:
        """``num_shares`` and ``reconstruction_threshold`` as SecAgg+ takes them: a count (int) or a fraction."""
        return {"num_shares": _count_or_fraction(self.secagg_shares),
                "reconstruction_threshold": _count_or_fraction(self.secagg_threshold)}

    @property
    def expected_evaluate_clients(self) -> int:
        """Clients asked to evaluate each round: 0 with ``fraction_evaluate`` 0, else the rounded share (>= 1)."""
        return 0 if self.fraction_evaluate == 0 else max(1, round(self.fraction_evaluate * self.num_clients))

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
        values = _nest_strategy_params(values)
        for raw_key, value in values.items():
            key = aliases.get(raw_key.replace("-", "_"), raw_key.replace("-", "_"))
            if key not in known:
                raise ConfigError(
                    f"unknown setting {raw_key!r}: known settings are "
                    + ", ".join(sorted(k.replace("_", "-") for k in known))
                )
            changes[key] = _coerce(key, value)
        for key in _ZERO_IS_UNSET if zero_is_unset else ():
            if changes.get(key) == 0:
                changes[key] = None
        return dataclasses.replace(base or cls(), **changes)

    def to_flat_dict(self) -> dict[str, Any]:
        """JSON-able view, written beside every run so it can be reproduced."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["partition"] = str(self.partition)
        out["out"] = str(self.out)
        out["strategy_params"] = self.strategy_params.to_dict()
        return out


#: Optional numbers that Flower's run config (which has no None) writes as 0 for "not set".
_ZERO_IS_UNSET = (
    "epsilon", "noise_multiplier", "max_update_norm", "client_noise_multiplier", "client_epsilon", "client_clip_norm",
)
_PARAMS_PREFIXES = ("strategy-params.", "strategy_params.")


def _nest_strategy_params(values: Mapping[str, Any]) -> dict[str, Any]:
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
    return RunConfig.from_mapping(_strategy_table(data, dict(table)), base=base)


def _strategy_table(data: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    """The strategy's settings live in a ``[strategy]`` table (optionally with ``name = "krum"``), its name may
    also be ``strategy = "krum"`` among the other settings."""
    tables = [t for t in (data.get("strategy"), table.get("strategy")) if isinstance(t, dict)]
    if not tables:
        return table
    if isinstance(table.get("strategy"), dict):
        del table["strategy"]
    merged = {k: v for t in tables for k, v in t.items()}
    name = merged.pop("name", None)
    if name is not None:
        table.setdefault("strategy", name)
    table["strategy_params"] = {**dict(table.get("strategy_params", {}) or {}), **merged}
    return table


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def normalise_device_spec(spec: Any) -> str:
    """``spec`` lower-cased and checked for spelling (``auto``, ``cpu``, ``cuda``, ``cuda:N``); whether the device
    exists is checked on the training machine by :func:`fedshield.device.resolve_device`."""
    text = spec.strip().lower() if isinstance(spec, str) else spec
    if not isinstance(text, str) or not _DEVICE_SPEC.fullmatch(text):
        raise ConfigError(
            f"device must be auto, cpu, cuda or cuda:N (N = GPU index, e.g. cuda:0), got {spec!r}: "
            "e.g. --device auto (a CUDA GPU if there is one, else the CPU)"
        )
    return text


def _check_hardware(max_physical_batch_size: Any, amp: Any, grad_sample_mode: str, where: str) -> None:
    _check_int(max_physical_batch_size, f"{where}max-physical-batch-size (0: no cap)", 0)
    if not isinstance(amp, bool):
        raise ConfigError(f"{where}amp must be true or false, got {amp!r}")
    if amp and grad_sample_mode not in AMP_GRAD_SAMPLE_MODES:
        why = (
            "Opacus's expanded weights do not support autocast" if grad_sample_mode == "ew" else
            "under bf16, ghost clipping measures each example's gradient norm in bf16 and clips in a separate pass, "
            "so clipped gradients came out up to 0.8% longer than max-grad-norm and epsilon would be understated"
        )
        raise ConfigError(
            f"{where}--amp (bf16 autocast) needs grad-sample-mode {' or '.join(AMP_GRAD_SAMPLE_MODES)}, got "
            f"{grad_sample_mode!r}: {why}. Add --grad-sample-mode hooks, or drop --amp"
        )


def _check_count_or_fraction(value: float, name: str, *, min_count: int, example: str) -> None:
    ok = math.isfinite(value) and (0 < value <= 1 or (value >= min_count and float(value).is_integer()))
    if not ok:
        raise ConfigError(f"{name} must be a fraction in (0, 1] or a whole count >= {min_count}, got {value!r}: "
                          f"e.g. {example}")


def _count_or_fraction(value: float) -> int | float:
    return int(value) if value > 1 else float(value)


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
    if key == "strategy_params":
        if not isinstance(value, Mapping):
            raise ConfigError(f"strategy-params must be a table of settings (e.g. [strategy] beta = 0.2), got {value!r}")
        return StrategyParams(value)
    if key in {"strategy", "client_dp", "client_sampling", "device"}:
        if not isinstance(value, str):
            raise ConfigError(f"{key.replace('_', '-')} must be text, got {value!r}")
        return value.strip().lower()
    if value is None and key in _ZERO_IS_UNSET:
        return None
    if key in {"num_clients", "num_rounds", "local_epochs", "seed", "quantize", "max_physical_batch_size"}:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key.replace('_', '-')} must be a whole number, got {value!r}")
    if key in {"dp", "secagg", "amp"} and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if key in {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "lr", "fraction_train",
               "fraction_evaluate", "round_timeout", "secagg_shares", "secagg_threshold", *_ZERO_IS_UNSET}:
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
    quantize: int = 0  # bits per value of the update the client sends back (0: float, as trained)
    proximal_mu: float = 0.0  # FedProx: mu/2 * ||w - w_global||^2 is added to the local loss (0: off)
    client_dp: str = "off"  # client-level DP mode; "distributed": this client clips and adds its noise share
    client_clip_norm: float = 0.0  # distributed client-level DP: bound C on the L2 norm of the update
    client_noise_std_share: float = 0.0  # distributed: std of this client's Gaussian noise, z * C / sqrt(n)
    device: str = "auto"  # where to train; a deployed site's node config "device" overrides it
    max_physical_batch_size: int = 0  # DP-SGD examples per forward/backward pass (0: the whole Poisson batch)
    amp: bool = False  # bf16 autocast for the forward pass
    frozen_digest: str = ""  # SHA-256 of a partial model's frozen weights ("" = every weight travels)
    sim_data: str = ""  # simulation only: the file the virtual clients partition instead of the bundled data
    text_column: str = ""  # with sim_data: its text column (text tasks)
    label_column: str = ""  # with sim_data: its label column

    def __post_init__(self) -> None:
        if self.client_dp not in CLIENT_DP_MODES:
            raise ConfigError(f"round config: unknown client-dp mode {self.client_dp!r}")
        if not (self.proximal_mu >= 0 and math.isfinite(self.proximal_mu)):
            raise ConfigError(f"round config: proximal-mu must be >= 0, got {self.proximal_mu}")
        if self.client_dp == "distributed" and not (
            self.client_clip_norm > 0 and self.client_noise_std_share >= 0 and math.isfinite(self.client_noise_std_share)
        ):
            raise ConfigError(
                f"round config: distributed client-level DP needs client-clip-norm > 0 and a noise share >= 0, "
                f"got {self.client_clip_norm} and {self.client_noise_std_share}"
            )
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
        try:
            object.__setattr__(self, "device", normalise_device_spec(self.device))
        except ConfigError as exc:
            raise ConfigError(f"round config: {exc}") from None
        _check_hardware(self.max_physical_batch_size, self.amp, self.grad_sample_mode, "round config: ")

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
                    kwargs[f.name] = f.default
                    continue
                raise ConfigError(
                    f"round config is missing {key!r}: server and client run different fedshield versions? "
                    "Install the same version on both sides"
                )
            kwargs[f.name] = record[key]
        for name in ("server_round", "num_rounds", "seed", "local_epochs", "quantize", "max_physical_batch_size"):
            kwargs[name] = int(kwargs[name])
        for name in ("lr", "sample_rate", "noise_multiplier", "max_grad_norm", "target_epsilon", "delta",
                     "proximal_mu", "client_clip_norm", "client_noise_std_share"):
            kwargs[name] = float(kwargs[name])
        kwargs["client_dp"] = str(kwargs["client_dp"])
        kwargs["device"] = str(kwargs["device"])
        for name in ("dp", "amp"):
            kwargs[name] = bool(kwargs[name])
        return cls(**kwargs)
