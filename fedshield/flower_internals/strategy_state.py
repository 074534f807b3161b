"""Names of the attributes of Flower's Message-API strategies that carry state between rounds (read by checkpoints)."""

from __future__ import annotations

__all__ = ["STATE_ATTRS"]

#: ``current_arrays``, ``m_t``, ``v_t``: the FedOpt family (FedAdam, FedYogi, FedAdagrad); ``momentum_vector``:
#: FedAvgM. A resumed run restores them, so a stateful strategy continues rather than restarting its moments.
STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")
