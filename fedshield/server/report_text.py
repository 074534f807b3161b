"""The sentences of ``privacy.json`` (:mod:`fedshield.server.report`): what each guarantee is proven for, who is
trusted, where the noise comes from. Text only, so the report's accounting reads without them."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["client_adjacency", "client_statement", "client_trust", "noise_statement", "randomness"]


def noise_statement(client: Any) -> str:
    if client.partition_id is not None:
        return "simulated: torch generator seeded from the run's seed, reproducible, so epsilon is nominal"
    return "deployed fedshield site: CSPRNG (ChaCha20) Gaussian with Opacus secure_mode's mitigation"


def randomness(clients: Any) -> dict[str, Any]:
    simulated = any(c.partition_id is not None for c in clients)
    return {
        "simulated": simulated,
        "statement": ("SIMULATION: every client's sampling and noise are reproducible from the run's seed, so "
                      "anyone who knows the seed can subtract the noise: the epsilon figures are nominal"
                      if simulated else "each site draws its DP-SGD noise from a CSPRNG it seeds itself"),
    }


def client_statement(eps: float | None, delta: float, adjacency: str) -> str:
    if eps is None:
        return ("epsilon pending: computed at the end of the run (or recompute it now from the history above with "
                "fedshield.server.report.recompute_client_epsilon)")
    if not math.isfinite(eps):
        return "no finite guarantee"
    return f"the released models are ({eps:.4g}, {delta:g})-DP under {adjacency}"


def client_adjacency(sampling: str) -> str:
    if sampling == "poisson":
        return "add/remove of one client's entire contribution (Poisson client sampling, amplified)"
    return ("zero-out of one client: its update replaced by zero, the fixed-size sample and its size unchanged "
            "(no amplification, q = 1); NOT add/remove, which under fixed-size sampling is a substitution")


def client_trust(mode: str, secagg: bool) -> str:
    if mode == "central":
        return "the server sees every individual update and is trusted to clip and add the noise"
    if secagg:
        return "clients clip and add noise shares before SecAgg+ masking; the server sees only the noisy sum"
    return ("clients clip and add noise shares, but without SecAgg+ the server sees each update with only its "
            "share of the noise: the guarantee holds for the released models, not against the server")
