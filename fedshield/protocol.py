"""The wire contract between the fedshield ServerApp and ClientApp.

Both sides import these names so that a key can never be spelt two ways. Only this module and
:mod:`fedshield.config` know the Flower record layout of a round.

Layout of a *train* or *evaluate* message from the server::

    content["arrays"]  ArrayRecord   global model weights (torch state-dict order)
    content["config"]  ConfigRecord  round settings: the keys below

Layout of a reply::

    content["arrays"]  ArrayRecord   (train only) the client's new local weights
    content["metrics"] MetricRecord  always holds NUM_EXAMPLES; DP clients add their ledger figures
"""

from __future__ import annotations

from typing import Final

ARRAYS: Final = "arrays"
CONFIG: Final = "config"
METRICS: Final = "metrics"

#: Weight of a reply in FedAvg-style aggregation; in every train and evaluate reply.
NUM_EXAMPLES: Final = "num-examples"
#: The value of NUM_EXAMPLES in a train reply under DP: a public constant, never the site's record count, so the
#: reply cannot tell apart two data sets that differ by one record (add/remove adjacency).
PUBLIC_WEIGHT: Final = 1.0

# --- round config keys (server -> client) -------------------------------------------------------------------
SERVER_ROUND: Final = "server-round"
NUM_ROUNDS: Final = "num-rounds"
TASK: Final = "task"
PARTITION: Final = "partition"
SEED: Final = "seed"
LOCAL_EPOCHS: Final = "local-epochs"
LEARNING_RATE: Final = "lr"
SAMPLE_RATE: Final = "sample-rate"
DP_ENABLED: Final = "dp"
NOISE_MULTIPLIER: Final = "noise-multiplier"
MAX_GRAD_NORM: Final = "max-grad-norm"
TARGET_EPSILON: Final = "target-epsilon"
DELTA: Final = "delta"
ACCOUNTANT: Final = "accountant"
RUN_ID: Final = "run-id"

# --- reply metric keys (client -> server) ------------------------------------------------------------------
EPSILON: Final = "epsilon"
STEPS: Final = "steps"
ROUNDS_TRAINED: Final = "rounds-trained"
TRAIN_LOSS: Final = "train-loss"
EVAL_LOSS: Final = "loss"
EVAL_ACCURACY: Final = "accuracy"
PARTITION_ID: Final = "partition-id"

#: Prefix of a reply error reason that means "refused: privacy budget exhausted".
BUDGET_REFUSAL: Final = "fedshield:budget-exhausted"
#: Reply error prefixes a site sends only BEFORE it charges its ledger (budget, plain-update and site-policy
#: refusals). Every other failed train reply of a DP round is charged in privacy.json: the site charges before it
#: trains, so its masked vector, a late reply or a crash may follow a charge the server never saw confirmed.
#: Prefix of a site refusing a round that breaks its own privacy policy (fedshield.client.policy).
POLICY_REFUSAL: Final = "fedshield:policy-refused"
#: Prefix of a site refusing an app bundle that carries code or names another ClientApp (deploy.site_clientapp).
CODE_REFUSAL: Final = "fedshield:code-refused"
UNCHARGED_REFUSALS: Final = (BUDGET_REFUSAL, "fedshield:plain-update-refused", POLICY_REFUSAL, CODE_REFUSAL)

#: Prefix of a reply error reason that means "this site refused the SecAgg+ round" (keys not signed by its roster,
#: a request no honest server sends); the site sent no shares.
SECAGG_REFUSAL: Final = "fedshield:secagg-refused"
#: SecAgg+ SETUP reply fields of fedshield's client: the mask expansion it uses, the signature of its two round
#: public keys and the signer's fingerprint (forwarded by the server in SHARE_KEYS).
SECAGG_MASK_PRG: Final = "fedshield-mask-prg"
SECAGG_SIGNATURE: Final = "fedshield-signature"
SECAGG_SIGNER: Final = "fedshield-signer"


# --- what the server learns of one client in one round -----------------------------------------------------
from dataclasses import dataclass, field  # noqa: E402


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
