"""The server's half of record-level distributed DP: decode the SecAgg+ field sum and take one DP-SGD step.

The unmasked sum is the sites' summed clipped per-record gradients plus the Skellam noise of at least
``min_honest`` sites (:mod:`fedshield.privacy.skellam`). Dividing by the *expected* batch size over the union
(``q * N``, a public setting) and stepping is exactly Opacus' DP-SGD step on the union of the sites' records
(``loss_reduction="mean"``); everything here is post-processing of the accounted noisy sum.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ..crypto.rotation import RandomizedHadamard
from ..errors import PrivacyError
from ..privacy.skellam import SkellamPlan, decode_sum

__all__ = ["dp_sgd_step"]


def dp_sgd_step(
    params: dict[str, NDArray[np.floating]], field_sum: NDArray[np.integer], plan: SkellamPlan,
    rotation: RandomizedHadamard, *, lr: float, expected_batch: float,
) -> dict[str, NDArray[np.floating]]:
    """New trainable parameters (same keys, order and dtypes as ``params``, the model's trainable ones in order)."""
    if not expected_batch > 0:
        raise PrivacyError(f"the expected batch size over the union must be > 0, got {expected_batch}")
    gradient = decode_sum(field_sum, plan, rotation) / expected_batch
    total = sum(int(v.size) for v in params.values())
    if total != gradient.size:
        raise PrivacyError(f"the decoded sum has {gradient.size} entries, the model's trainable parameters {total}")
    out, start = {}, 0
    for key, value in params.items():
        step = gradient[start:start + value.size].reshape(value.shape)
        out[key] = (value.astype(np.float64) - lr * step).astype(value.dtype)
        start += value.size
    return out
