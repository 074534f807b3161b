"""Validated, frozen settings of a federated run.

With :mod:`.files` this is the only code that reads TOML files or Flower's config mappings. Everything downstream
receives a :class:`RunConfig` that has already been checked against the maths (a probability is in (0, 1],
epsilon > 0, ...), so a bad value fails at start-up with a message naming the key and the fix, never mid-run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .checks import check_count_or_fraction, check_hardware, check_int, count_or_fraction, normalise_device_spec
from .checks import normalise_sample_rate
from .coerce import ZERO_IS_UNSET, coerce, nest_strategy_params
from .names import ACCOUNTANTS, CLIENT_DP_MODES, CLIENT_SAMPLING, DISPATCH_LOOPS, GRAD_SAMPLE_MODES, ROBUST_STRATEGIES
from .names import DP_MODES, STRATEGIES
from .specs import PartitionSpec, StrategyParams

__all__ = ["RunConfig"]


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
        dispatch: how the simulation engine hands messages to virtual clients: ``fedshield`` (one walk of the
            message store per sweep) or ``flower`` (Flower's own loop: the escape hatch if a Flower upgrade breaks
            ours). Simulation only; a deployment ignores it.
        node_wait_timeout: seconds the server waits for ``num_clients`` clients to connect before the first round;
            then the run fails naming the fix. Always finite: a federation smaller than asked must not hang.
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
    # Federated evaluation as its own message every round (the model after each round, one message more per round)
    # instead of inside the next round's train message (strategies.recording): off by default.
    separate_evaluation: bool = False
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
    dispatch: str = "fedshield"
    node_wait_timeout: float = 300.0
    dp_mode: str = "local"  # record-level DP: "local" (each site noises its own DP-SGD) or "distributed" (Skellam)
    min_honest: float = 0.5  # distributed: sites (count, or fraction of a round's sites) assumed to add their noise
    ddp_records: int = 0  # distributed: public estimate of the union's training records (0: the simulation's own)
    data: str = ""  # simulate: a data file partitioned among the virtual clients instead of the bundled data
    text_column: str = ""  # with data: the text column of a text task's table (default "text")
    label_column: str = ""  # with data: the label column (default "label")

    def __post_init__(self) -> None:
        check_int(self.num_clients, "clients", 1)
        check_int(self.num_rounds, "rounds", 1)
        check_int(self.local_epochs, "local-epochs", 1)
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
        if self.dp and self.noise_multiplier == 0:
            raise ConfigError("noise multiplier 0 with DP on has an infinite epsilon (the server rejects every such "
                              "update): give a positive --noise-multiplier or --epsilon, or --no-dp")
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
        check_count_or_fraction(self.secagg_shares, "secagg-shares", min_count=3, example="1.0 (all) or 5")
        check_count_or_fraction(self.secagg_threshold, "secagg-threshold", min_count=2, example="0.66 or 3")
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
        object.__setattr__(self, "sample_rate", normalise_sample_rate(self.sample_rate))
        object.__setattr__(self, "out", Path(self.out))
        if not isinstance(self.strategy_params, StrategyParams):
            object.__setattr__(self, "strategy_params", StrategyParams(self.strategy_params))
        self._check_aggregation()
        self._check_client_dp()
        if self.dispatch not in DISPATCH_LOOPS:
            raise ConfigError(f"unknown dispatch {self.dispatch!r}: choose one of {', '.join(DISPATCH_LOOPS)}")
        self._check_dp_mode()
        object.__setattr__(self, "device", normalise_device_spec(self.device))
        check_hardware(self.max_physical_batch_size, self.amp, self.grad_sample_mode, "")
        timeout = self.round_timeout
        if isinstance(timeout, bool) or not (isinstance(timeout, (int, float)) and timeout > 0 and math.isfinite(timeout)):
            raise ConfigError(
                f"round-timeout must be a finite number of seconds > 0, got {self.round_timeout!r}: e.g. "
                "--round-timeout 600 (longer than the slowest site's round)"
            )
        object.__setattr__(self, "round_timeout", float(timeout))
        wait = self.node_wait_timeout
        if isinstance(wait, bool) or not (isinstance(wait, (int, float)) and wait > 0 and math.isfinite(wait)):
            raise ConfigError(f"node-wait-timeout must be a finite number of seconds > 0, got {wait!r}: e.g. 300")
        object.__setattr__(self, "node_wait_timeout", float(wait))

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

    def _check_dp_mode(self) -> None:
        if self.dp_mode not in DP_MODES:
            raise ConfigError(f"unknown dp-mode {self.dp_mode!r}: choose one of {', '.join(DP_MODES)}")
        check_count_or_fraction(self.min_honest, "min-honest", min_count=1, example="0.5 or 3")
        if self.dp_mode == "local":
            return
        needs = [why for bad, why in (
            (not self.dp, "DP on (drop --no-dp)"), (not self.secagg, "SecAgg+ (drop --no-secagg): the server must see "
                                                   "only the sum of the noise shares"),
            (self.client_dp != "off", "--client-dp off"), (self.quantize != 0, "no --quantize (the field is the "
                                                                                "mechanism's)"),
            (self.local_epochs != 1, "--local-epochs 1 (one DP-SGD step per round over the union)"),
            (self.client_sampling != "fixed" or self.fraction_train != 1.0, "every site in every round "
                                                                            "(--fraction-train 1)"),
            (self.strategy != "fedavg", "--strategy fedavg"),
        ) if bad]
        if needs:
            raise ConfigError(f"--dp-mode distributed needs {'; '.join(needs)}")
        if self.min_honest > self.num_clients:
            raise ConfigError(f"min-honest {self.min_honest:g} exceeds the {self.num_clients} sites: lower it")

    @property
    def min_honest_count(self) -> int:
        """``min_honest`` as a count of the round's sites (a fraction rounds up: never weaker than asked)."""
        h = self.min_honest
        return int(h) if h > 1 else max(1, math.ceil(h * self.num_clients - 1e-9))

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
        return {"num_shares": count_or_fraction(self.secagg_shares),
                "reconstruction_threshold": count_or_fraction(self.secagg_threshold)}

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
        values = nest_strategy_params(values)
        for raw_key, value in values.items():
            key = aliases.get(raw_key.replace("-", "_"), raw_key.replace("-", "_"))
            if key not in known:
                raise ConfigError(
                    f"unknown setting {raw_key!r}: known settings are "
                    + ", ".join(sorted(k.replace("_", "-") for k in known))
                )
            changes[key] = coerce(key, value)
        for key in ZERO_IS_UNSET if zero_is_unset else ():
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
