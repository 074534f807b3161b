"""The wire contract between the fedshield ServerApp and ClientApp.

Both sides import these names so that a key can never be spelt two ways: record keys, reply metric keys, error
codes and reason prefixes, and :class:`RoundSettings` (the round config). Only this module knows the Flower record
layout of a round.

Layout of a *train* or *evaluate* message from the server::

    content["arrays"]  ArrayRecord   global model weights (torch state-dict order)
    content["config"]  ConfigRecord  round settings: the keys below

Layout of a reply::

    content["arrays"]  ArrayRecord   (train only) the client's new local weights
    content["metrics"] MetricRecord  always holds NUM_EXAMPLES; DP clients add their ledger figures
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from .config.checks import check_hardware, normalise_device_spec, normalise_sample_rate
from .config.names import ACCOUNTANTS, CLIENT_DP_MODES
from .errors import ConfigError

ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"

#: Weight of a reply in FedAvg-style aggregation; in every train and evaluate reply.
NUM_EXAMPLES: Final = "num-examples"
#: The value of NUM_EXAMPLES in a train reply under DP: a public constant, never the site's record count, so the
#: reply cannot tell apart two data sets that differ by one record (add/remove adjacency).
PUBLIC_WEIGHT: Final = 1.0

#: Run-config key (not a RunConfig field) with which ``fedshield server --resume`` asks the ServerApp to continue
#: ``out`` from its last checkpoint instead of starting over.
RESUME_KEY: Final = "resume"

# --- round config (server -> client) -------------------------------------------------------------------------
# The keys of content["config"] are RoundSettings' field names with '-' (round_config_key): "server-round",
# "num-rounds", "noise-multiplier", ... RoundSettings.to_record_dict / from_record_dict are the only code that
# writes or reads them, so a key cannot be spelt two ways.


def round_config_key(field_name: str) -> str:
    """The ConfigRecord key of a :class:`RoundSettings` field (Flower's kebab-case)."""
    return field_name.replace("_", "-")


# --- reply metric keys (client -> server) ------------------------------------------------------------------
EPSILON: Final = "epsilon"
STEPS: Final = "steps"
ROUNDS_TRAINED: Final = "rounds-trained"
TRAIN_LOSS: Final = "train-loss"
EVAL_LOSS: Final = "loss"
EVAL_ACCURACY: Final = "accuracy"
#: Train config key (server -> client, bool): before training, evaluate the global model the message carries on the
#: site's test split and add the figures to the train reply under the RECEIVED_* keys. This is the federated
#: evaluation of the previous round's model folded into this round's message, so it costs no message of its own.
EVALUATE_RECEIVED: Final = "evaluate-received"
#: The evaluate reply's NUM_EXAMPLES, EVAL_LOSS and EVAL_ACCURACY of the received model, in a train reply.
RECEIVED_EXAMPLES: Final = "received-num-examples"
RECEIVED_LOSS: Final = "received-loss"
RECEIVED_ACCURACY: Final = "received-accuracy"
RECEIVED_KEYS: Final = (RECEIVED_EXAMPLES, RECEIVED_LOSS, RECEIVED_ACCURACY)
#: The delta the site's own ledger accounts at (its policy may set its own).
DELTA: Final = "delta"
PARTITION_ID: Final = "partition-id"

# --- liveness (SuperNode -> SuperLink) ---------------------------------------------------------------------------
#: Seconds between a site's heartbeats, as its SuperNode announces them (Flower's default: 30; its minimum: 10).
#: The SuperLink counts a node online for 2 intervals after its last one: a crashed site is noticed within 30 s.
NODE_HEARTBEAT_S: Final = 15.0
#: Longest fedshield's SuperLink holds a pull that finds nothing (:mod:`fedshield.flower_internals.held_pulls`).
PULL_HOLD_S: Final = 1.0
#: An empty pull that took this long was held: its client pulls again at once instead of sleeping a poll interval.
#: Close to the hold, so that a SuperLink that answers at once but slowly (Flower's, loaded) is still slept on.
HELD_PULL_S: Final = 0.8 * PULL_HOLD_S

# --- reply error codes and reasons (client -> server) -------------------------------------------------------
#: Error code of a reply the site refused to train for (budget, policy, plain update, SecAgg+ keys).
REFUSAL_CODE: Final = 4001
#: Error code of a reply whose round config the site could not read (version skew, a hostile server).
CONFIG_ERROR_CODE: Final = 4002
#: Error code of a reply the site's warm training worker failed (unreachable, crashed, bad reply).
WORKER_ERROR_CODE: Final = 4004
#: Error code of a deployed site refusing to send its update without SecAgg+ (client.app).
PLAIN_REFUSED_CODE: Final = 4003
#: Error code of a request refused by the site's own privacy policy (client.policy).
POLICY_REFUSED_CODE: Final = 4005
#: Error code of a site refusing a SecAgg+ round; the reason starts with SECAGG_REFUSAL. (Same number as
#: CODE_REFUSED_CODE since before this module held both; the reason prefix tells them apart.)
SECAGG_REFUSED_CODE: Final = 4006
#: Error code of a site refusing the run's app bundle (deploy.site_clientapp).
CODE_REFUSED_CODE: Final = 4006
#: Error code the server's grid gives a reply it could not read (a malformed packed array: fedshield.wire); the
#: reason starts with REJECTED.
MALFORMED_REPLY_CODE: Final = 4007
#: Reason prefix of a reply the server's update validation rejected (strategies.validation).
REJECTED: Final = "fedshield:rejected"
#: Reason prefix of a site refusing to send its update unmasked (no SecAgg+ on a DP round).
PLAIN_UPDATE_REFUSAL: Final = "fedshield:plain-update-refused"

#: Prefix of a reply error reason that means "refused: privacy budget exhausted".
BUDGET_REFUSAL: Final = "fedshield:budget-exhausted"
#: Reply error prefixes a site sends only BEFORE it charges its ledger (budget, plain-update and site-policy
#: refusals). Every other failed train reply of a DP round is charged in privacy.json: the site charges before it
#: trains, so its masked vector, a late reply or a crash may follow a charge the server never saw confirmed.
#: Prefix of a site refusing a round that breaks its own privacy policy (fedshield.client.policy).
POLICY_REFUSAL: Final = "fedshield:policy-refused"
#: Prefix of a site refusing an app bundle that carries code or names another ClientApp (deploy.site_clientapp).
CODE_REFUSAL: Final = "fedshield:code-refused"
UNCHARGED_REFUSALS: Final = (BUDGET_REFUSAL, PLAIN_UPDATE_REFUSAL, POLICY_REFUSAL, CODE_REFUSAL)

#: Prefix of a reply error reason that means "this site refused the SecAgg+ round" (keys not signed by its roster,
#: a request no honest server sends); the site sent no shares.
SECAGG_REFUSAL: Final = "fedshield:secagg-refused"
#: SecAgg+ SETUP reply fields of fedshield's client: the mask expansion it uses, the signature of its two round
#: public keys and the signer's fingerprint (forwarded by the server in SHARE_KEYS).
SECAGG_MASK_PRG: Final = "fedshield-mask-prg"
SECAGG_SIGNATURE: Final = "fedshield-signature"
SECAGG_SIGNER: Final = "fedshield-signer"
#: SecAgg+ one round ahead (:mod:`fedshield.strategies._secagg_pipeline`): the next round's part rides in the SecAgg+
#: record itself (one Flower object per message: each object costs a request on every hop), its fields named with
#: this prefix: a masked-vector request's round tag, its reply's keys for that round; an UNMASK request's settings
#: for the next round, its reply's encrypted key shares (or SECAGG_NEXT_REFUSED and why).
SECAGG_NEXT: Final = "fedshield-next:"
#: Prefix of an UNMASK request's entries for the next round's participants: ``prefix + str(node id) -> signed keys``.
SECAGG_NEXT_KEY: Final = "fedshield-next-key:"
#: The round tag (the next round's message group id) the site signs its next keys for.
SECAGG_ROUND_TAG: Final = "fedshield-round-tag"
SECAGG_NEXT_REFUSED: Final = "fedshield-next-refused"


#: A masked-vector request's flag asking for the compact reply: the example count (SECAGG_COUNT) and the clear
#: metrics (prefix SECAGG_METRIC) in the SecAgg+ record beside the masked vector, instead of Flower's legacy FitRes
#: layout (four more records, each a Flower object and a request per hop: issue 13).
SECAGG_COMPACT: Final = "fedshield-compact-reply"
SECAGG_COUNT: Final = "fedshield-count"
SECAGG_METRIC: Final = "fedshield-metric:"


def take_prefixed(record: Any, prefix: str) -> dict[str, Any] | None:
    """Remove the fields named ``prefix + name`` from ``record`` (a mutable mapping); ``{name: value}``, or None if
    it had none."""
    names = [key for key in record if key.startswith(prefix)]
    return {key[len(prefix):]: record.pop(key) for key in names} if names else None


def prefixed(prefix: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """``fields`` with every name prefixed, to ride in another record."""
    return {prefix + name: value for name, value in fields.items()}


# --- what the server learns of one client in one round -----------------------------------------------------

@dataclass(frozen=True)
class ClientReply:
    """One client's outcome in one training round, as the server may see it.

    Under secure aggregation the server never sees a client's update, only this: its example count and the
    figures of its privacy ledger (which are functions of public mechanism parameters, not of its data), or the
    reason it did not contribute.
    """

    node_id: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

#: Distributed record-level DP (``--dp-mode distributed``): the train reply's one array, the site's Skellam field
#: vector (:mod:`fedshield.privacy.skellam`), and the min-honest count the site sized its noise share for (a public
#: setting, in clear) that SecAgg+ enforces at UNMASK.
SKELLAM_FIELD: Final = "skellam-field"
MIN_HONEST: Final = "min-honest"

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
    dp_mode: str = "local"  # "distributed": the site sends Skellam field integers (fedshield.privacy.skellam)
    min_honest: int = 0  # distributed: sites whose noise shares must reach the sum (each adds total/min_honest)
    ddp_sites: int = 0  # distributed: sites in the round (sizes the field's scale)
    ddp_batch_bound: int = 0  # distributed: public bound on the union's Poisson batch (sizes the field's scale)
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
        object.__setattr__(self, "sample_rate", normalise_sample_rate(self.sample_rate))
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(f"round config: unknown accountant {self.accountant!r}")
        if not (0 < self.delta < 1):
            raise ConfigError(f"round config: delta must be in (0, 1), got {self.delta}")
        try:
            object.__setattr__(self, "device", normalise_device_spec(self.device))
        except ConfigError as exc:
            raise ConfigError(f"round config: {exc}") from None
        check_hardware(self.max_physical_batch_size, self.amp, self.grad_sample_mode, "round config: ")

    @property
    def steps_per_round(self) -> int:
        """DP-SGD steps a client takes in this round (the same figure as ``RunConfig.steps_per_round``)."""
        return round(1 / self.sample_rate) * self.local_epochs

    def to_record_dict(self) -> dict[str, Any]:
        """Flat dict of ConfigRecord-able scalars: the round config keys are the field names with '-' (one
        spelling, derived here and in :meth:`from_record_dict`, never written twice)."""
        return {round_config_key(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_record_dict(cls, record: Mapping[str, Any]) -> RoundSettings:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = round_config_key(f.name)
            if key not in record:
                if f.default is not dataclasses.MISSING:
                    kwargs[f.name] = f.default
                    continue
                raise ConfigError(
                    f"round config is missing {key!r}: server and client run different fedshield versions? "
                    "Install the same version on both sides"
                )
            kwargs[f.name] = record[key]
        for name in ("server_round", "num_rounds", "seed", "local_epochs", "quantize", "max_physical_batch_size",
                     "min_honest", "ddp_sites", "ddp_batch_bound"):
            kwargs[name] = int(kwargs[name])
        for name in ("lr", "sample_rate", "noise_multiplier", "max_grad_norm", "target_epsilon", "delta",
                     "proximal_mu", "client_clip_norm", "client_noise_std_share"):
            kwargs[name] = float(kwargs[name])
        kwargs["client_dp"], kwargs["dp_mode"] = str(kwargs["client_dp"]), str(kwargs["dp_mode"])
        kwargs["device"] = str(kwargs["device"])
        for name in ("dp", "amp"):
            kwargs[name] = bool(kwargs[name])
        return cls(**kwargs)
