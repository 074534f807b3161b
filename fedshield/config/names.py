"""The names users may type for a run's choices: strategies, accountants, grad-sample modes, partitions, ...

Kept apart from :mod:`.run` so light modules (the ClientApp shim, accounting) can list them without the rest.
"""

from __future__ import annotations

__all__ = [
    "ACCOUNTANTS", "BUILTIN_TASKS", "AMP_GRAD_SAMPLE_MODES", "CLIENT_DP_MODES", "CLIENT_SAMPLING", "DISPATCH_LOOPS", "DP_MODES",
    "GRAD_SAMPLE_MODES",
    "PARTITION_KINDS", "ROBUST_STRATEGIES", "STRATEGIES",
]

#: The built-in tasks' names (:data:`fedshield.tasks.TASKS` builds them): known without importing torch.
BUILTIN_TASKS = ("digits", "breast-cancer")
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
#: Record-level DP: each site noises its own DP-SGD (local) or adds a Skellam share of one noise under SecAgg+
#: (distributed); see docs/PRIVACY.md, "Distributed record-level DP".
DP_MODES = ("local", "distributed")
#: How clients are sampled each round under client-level DP: a fixed number (Flower's sampling, accounted with
#: no amplification), or each client independently with probability fraction-train (amplified).
CLIENT_SAMPLING = ("fixed", "poisson")
#: Opacus grad-sample modes that keep the clipping bound under bf16 autocast (``--amp``): they clip the very
#: per-example gradients they measure (fedshield casts them to fp32 first). Ghost clipping measures norms in bf16
#: and clips in a separate pass (clipped norms measured up to 0.8% above the bound); ew does not support autocast.
AMP_GRAD_SAMPLE_MODES = ("hooks", "functorch")
#: How the simulation engine hands messages to virtual clients: ``fedshield`` (our dispatch loop, bounded by work,
#: :mod:`fedshield.simulation.dispatch`) or ``flower`` (Flower's own ``vce_api`` loop: the escape hatch if a Flower
#: upgrade breaks ours).
DISPATCH_LOOPS = ("fedshield", "flower")
