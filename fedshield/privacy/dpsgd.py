"""Local training: DP-SGD through Opacus, or plain SGD, over the same sampling so the two are comparable.

Privacy contract of :func:`train_dp_sgd`: each step samples every local example independently with probability
``sample_rate`` (Poisson), clips each per-example gradient to ``max_grad_norm`` and adds Gaussian noise of std
``noise_multiplier * max_grad_norm`` to their sum. The returned ``history`` is exactly what the accountant must be
fed. Using any other model, optimiser or data source than the ones passed in invalidates the guarantee.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..data.spec import Dataset
from ..errors import PrivacyError
from .accounting import HistoryEntry

__all__ = ["LocalTrainResult", "ProximalTerm", "train_dp_sgd", "train_plain", "evaluate", "make_generator"]


@dataclass(frozen=True)
class LocalTrainResult:
    mean_loss: float
    steps: int
    history: tuple[HistoryEntry, ...]  # empty for plain training


def make_generator(seed: int | None) -> torch.Generator:
    """A seeded generator for reproducible experiments, else one seeded from the OS entropy pool."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    return g


@contextmanager
def _quiet_opacus() -> Iterator[None]:
    # Opacus warns that secure_mode is off (fedshield documents its RNG choice in make_generator instead) and
    # torch warns about full backward hooks on the first layer, whose input needs no gradient: both expected.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        yield


def _tensor_dataset(data: Dataset) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))


def train_dp_sgd(
    model: nn.Module,
    data: Dataset,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    sample_rate: float,
    epochs: int,
    lr: float,
    loss_fn: nn.Module,
    generator: torch.Generator,
    grad_sample_mode: str = "hooks",
    proximal_mu: float = 0.0,
) -> LocalTrainResult:
    """Train ``model`` in place with DP-SGD; ``steps = epochs * round(1 / sample_rate)``.

    ``proximal_mu > 0`` adds FedProx's ``mu/2 * ||w - w_start||^2`` (``w_start``: the weights ``model`` holds on
    entry, i.e. the global model) to the objective; see :class:`ProximalTerm` for how it stays out of the privacy
    mechanism.
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    if len(data) == 0:
        raise PrivacyError("cannot run DP-SGD on an empty data set")
    steps_per_epoch = round(1 / sample_rate)
    proximal = ProximalTerm.for_model(model, mu=proximal_mu, lr=lr)
    loader = DPDataLoader(_tensor_dataset(data), sample_rate=sample_rate, generator=generator)
    if len(loader) != steps_per_epoch:  # the accountant is fed 1/len(loader): it must equal sample_rate
        raise PrivacyError(f"Poisson loader runs {len(loader)} steps, expected {steps_per_epoch} (q={sample_rate})")
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    with _quiet_opacus():
        engine = PrivacyEngine(accountant="prv")
        private = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=loss_fn,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=False,
            grad_sample_mode=grad_sample_mode, noise_generator=generator,
        )
    if grad_sample_mode == "ghost":
        module, dp_optimizer, criterion, dp_loader = private
    else:
        module, dp_optimizer, dp_loader = private
        criterion = loss_fn
    with _quiet_opacus():
        losses = _run_epochs(module, dp_optimizer, criterion, dp_loader, epochs, proximal)
    history = tuple((float(s), float(q), int(n)) for s, q, n in engine.accountant.history)
    expected = ((float(noise_multiplier), 1.0 / steps_per_epoch, epochs * steps_per_epoch),)
    if history != expected:
        raise PrivacyError(f"Opacus recorded {history}, expected {expected}: refusing to report a wrong epsilon")
    if hasattr(module, "_close"):
        module._close()  # remove Opacus hooks so the caller's model is an ordinary module again
    return LocalTrainResult(float(np.mean(losses)) if losses else float("nan"), epochs * steps_per_epoch, history)


def train_plain(
    model: nn.Module,
    data: Dataset,
    *,
    sample_rate: float,
    epochs: int,
    lr: float,
    loss_fn: nn.Module,
    generator: torch.Generator,
    proximal_mu: float = 0.0,
) -> LocalTrainResult:
    """Non-private baseline with the same expected batch size and step count as DP-SGD would use (and the same
    optional FedProx term)."""
    steps_per_epoch = round(1 / sample_rate)
    proximal = ProximalTerm.for_model(model, mu=proximal_mu, lr=lr)
    batch_size = max(1, int(np.ceil(len(data) * sample_rate)))
    loader = torch.utils.data.DataLoader(_tensor_dataset(data), batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = _run_epochs(model, optimizer, loss_fn, loader, epochs, proximal)
    return LocalTrainResult(float(np.mean(losses)) if losses else float("nan"), epochs * steps_per_epoch, ())


class ProximalTerm:
    """FedProx's proximal term ``mu/2 * ||w - w_global||^2``, applied as part of each plain SGD step.

    Its gradient ``mu * (w - w_global)`` depends on no data, so it is added outside Opacus: inside the loss, Opacus
    would clip it together with each example's gradient (ghost clipping) or drop it (per-sample hooks only see
    layer activations). Each step is ``w <- w - lr * (g + mu * (w - w_global))`` with ``g`` the (private) data
    gradient and ``w`` the pre-step weights: exactly SGD on ``loss + mu/2 ||w - w_global||^2`` for plain training,
    and DP-SGD plus a data-independent term (no privacy cost) for private training. Assumes plain SGD (no
    momentum, no weight decay), which is what fedshield's trainers use.
    """

    def __init__(self, params: list[torch.nn.Parameter], *, mu: float, lr: float) -> None:
        if not (mu >= 0 and np.isfinite(mu)):
            raise PrivacyError(f"proximal mu must be a finite number >= 0, got {mu}")
        self.params = params
        self.anchor = [p.detach().clone() for p in params]
        self.step_size = lr * mu

    @classmethod
    def for_model(cls, model: nn.Module, *, mu: float, lr: float) -> ProximalTerm | None:
        if mu == 0:
            return None
        return cls([p for p in model.parameters() if p.requires_grad], mu=mu, lr=lr)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def apply(self, before: list[torch.Tensor]) -> None:
        for param, old, anchor in zip(self.params, before, self.anchor, strict=True):
            param.sub_(self.step_size * (old - anchor))


def _run_epochs(module, optimizer, criterion, loader, epochs: int, proximal: ProximalTerm | None = None) -> list[float]:  # type: ignore[no-untyped-def]
    module.train()
    losses: list[float] = []
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            # An empty Poisson batch is still a step of the mechanism (noise only): it goes through forward and
            # backward like any other so Opacus sees zero-row per-sample gradients and adds the noise.
            loss = criterion(module(x), y)
            loss.backward()
            before = proximal.snapshot() if proximal is not None else None
            optimizer.step()
            if proximal is not None and before is not None:
                proximal.apply(before)
            if len(y):
                losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, loss_fn: nn.Module, *, batch_size: int = 512) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` on ``data``."""
    model.eval()
    total_loss, correct = 0.0, 0
    x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for start in range(0, len(data), batch_size):
        x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
        logits = model(x)
        total_loss += float(loss_fn(logits, y)) * len(y)
        correct += int((logits.argmax(dim=1) == y).sum())
    n = max(1, len(data))
    return total_loss / n, correct / n
