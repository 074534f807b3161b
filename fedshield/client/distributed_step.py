"""A site's part of one round of record-level distributed DP: Poisson-sample, clip per record, encode as Skellam.

Why not Opacus' optimizer step: in distributed mode the site does not step at all. It computes its records'
per-example gradients with Opacus' ``GradSampleModule``, clips each with Opacus' own clip factor, and hands the
clipped rows to :func:`fedshield.privacy.skellam.encode_site`; the server steps once on the decoded noisy sum of all
sites (one step of DP-SGD over the union of their records).
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from ..privacy.rotation import RandomizedHadamard
from ..dataspec import Dataset
from ..privacy.skellam import SkellamPlan, encode_site

__all__ = ["poisson_sample", "clipped_per_example_gradients", "site_field_vector", "flat_dim"]


def flat_dim(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def poisson_sample(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of the records sampled this round: each independently with probability ``sample_rate``."""
    return torch.nonzero(torch.rand(n, generator=generator) < sample_rate).flatten()


def clipped_per_example_gradients(model: nn.Module, data: Dataset, index: torch.Tensor, *, clip: float,
                                  loss_fn: nn.Module) -> NDArray[np.float64]:
    """``(len(index), dim)`` per-record gradients, each scaled by Opacus' clip factor ``min(1, C / (norm + 1e-6))``."""
    from opacus import GradSampleModule

    params = [p for p in model.parameters() if p.requires_grad]
    dim = sum(p.numel() for p in params)
    if len(index) == 0:
        return np.zeros((0, dim))
    gsm = GradSampleModule(model, loss_reduction="sum")
    try:
        x, y = torch.from_numpy(data.x[index.numpy()]), torch.from_numpy(data.y[index.numpy()])
        gsm.zero_grad(set_to_none=True)
        _summed(loss_fn, gsm(x), y).backward()
        rows = torch.cat([p.grad_sample.reshape(len(index), -1) for p in params], dim=1).double()
    finally:
        gsm.zero_grad(set_to_none=True)  # leaves no (per-sample) gradients on the caller's model
        gsm.remove_hooks()
    norms = rows.norm(dim=1)
    factor = (clip / (norms + 1e-6)).clamp(max=1.0)
    return (rows * factor[:, None]).numpy()


def _summed(loss_fn: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # The task's loss is a mean; per-record gradients must not depend on the batch size, so undo the mean.
    return loss_fn(logits, y) * len(y)


def site_field_vector(model: nn.Module, data: Dataset, plan: SkellamPlan, rotation: RandomizedHadamard, *,
                      sample_rate: float, loss_fn: nn.Module, generator: torch.Generator,
                      noise_rng: np.random.Generator | None) -> NDArray[np.int64]:
    """The integers this site puts into SecAgg+ for one round."""
    index = poisson_sample(len(data), sample_rate, generator)
    rows = clipped_per_example_gradients(model, data, index, clip=plan.clip, loss_fn=loss_fn)
    rounding = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    return encode_site(rows, plan, rotation, rounding_rng=rounding, noise_rng=noise_rng)
