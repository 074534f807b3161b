"""The keys of a client's node config: what ``fedshield client`` (or Flower's simulation engine) tells the ClientApp
about this site. Kept free of heavy imports: the per-message ClientApp process reads them before anything else."""

from __future__ import annotations

from typing import Final

__all__ = [
    "ACCOUNTANT",
    "ALLOW_NO_DP",
    "ALLOW_PLAIN_UPDATES",
    "BUDGET",
    "DATA_PATH",
    "DELTA",
    "DEVICE",
    "LABEL_COLUMN",
    "TEXT_COLUMN",
    "NODE_KEY",
    "NUM_PARTITIONS",
    "PARTITION_ID",
    "SECAGG_MIN_PEERS",
    "SECAGG_ROSTER",
    "STATE_DIR",
    "TASK",
    "WORKER_SOCKET",
]

# Set by `fedshield client` on a deployed SuperNode.
DATA_PATH: Final = "data-path"
STATE_DIR: Final = "state-dir"
LABEL_COLUMN: Final = "label-column"
TEXT_COLUMN: Final = "text-column"  # text tasks: the column holding each record's text
BUDGET: Final = "max-epsilon"
#: ``fedshield client --allow-plain-updates``: the site also trains in rounds without SecAgg+.
ALLOW_PLAIN_UPDATES: Final = "allow-plain-updates"
#: Unix socket of the warm worker (:mod:`fedshield.client.warm_worker`) that trains for this SuperNode's ClientApps.
WORKER_SOCKET: Final = "worker-socket"
# The site's own policy (fedshield.client.policy): what it accepts whatever the server sends.
#: The only task this site runs (``fedshield client --task``); a round naming another is refused.
TASK: Final = "task"
#: The site's delta: its ledger accounts at this delta; a round asking for a larger one is refused.
DELTA: Final = "delta"
#: The site's accountant (``prv`` or ``rdp``).
ACCOUNTANT: Final = "accountant"
#: ``fedshield client --allow-no-dp``: the site also trains in rounds without DP-SGD.
ALLOW_NO_DP: Final = "allow-no-dp"
#: ``fedshield client --roster``: authorized node public keys; SecAgg+ keys of peers must be signed by one of them.
SECAGG_ROSTER: Final = "secagg-roster"
#: ``fedshield client --node-key``: this site signs its SecAgg+ round keys with it.
NODE_KEY: Final = "node-key"
#: Fewest other signed SecAgg+ participants this site accepts in a round (site policy; default 2).
SECAGG_MIN_PEERS: Final = "secagg-min-peers"
#: Where this site trains (``auto``, ``cpu``, ``cuda``, ``cuda:N``); overrides the run's ``device`` setting.
DEVICE: Final = "device"

# Set by Flower's simulation engine on every virtual SuperNode.
PARTITION_ID: Final = "partition-id"
NUM_PARTITIONS: Final = "num-partitions"
