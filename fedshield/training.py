"""Local training and evaluation shared by the private and the plain path: the step loop, FedProx, evaluation.

:func:`fedshield.privacy.dpsgd.train_dp_sgd` runs the same loop (:func:`run_epochs`) over Opacus' private
optimizer and Poisson loader; :func:`train_plain` is the non-private baseline with the same expected batch size
and step count, so the two are comparable. Nothing here is a privacy mechanism: the guarantee, where there is
one, is stated and enforced in :mod:`fedshield.privacy.dpsgd`.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .dataspec import Dataset
from .errors import DataError, PrivacyError

__all__ = [
    "LocalTrainResult", "ProximalTerm", "device_generator", "evaluate", "make_generator", "mean_loss", "place_model",
    "run_epochs", "ShuffledBatches", "tensor_dataset", "train_plain",
]


@dataclass(frozen=True)
class LocalTrainResult:
    mean_loss: float
    steps: int
    history: tuple[tuple[float, float, int], ...]  # (sigma, q, steps) accountant entries; empty for plain
    secure_noise: bool = False  # the DP-SGD noise came from a CSPRNG (SecureGaussian), not torch's generator


def make_generator(seed: int | None) -> torch.Generator:
    """A seeded generator for reproducible experiments, else one seeded from the OS entropy pool."""
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") & (2**63 - 1))
    return g


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` itself if it lives on ``device``'s kind of device, else a generator on ``device`` seeded
    from it (torch draws random numbers for a CUDA tensor only from a CUDA generator)."""
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def tensor_dataset(data: Dataset) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))


def place_model(model: nn.Module, device: torch.device | str | None, loss_fn: nn.Module | None = None) -> torch.device:
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    # Module.to walks every module even when nothing moves: skipped for a CPU model, a simulated client's case.
    if not (device.type == "cpu" and all(t.device.type == "cpu" for t in _tensors_of(model))):
        model.to(device)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)  # e.g. class weights, a buffer of the loss
    return device


def _tensors_of(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


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


def run_epochs(  # type: ignore[no-untyped-def]
    module, optimizer, criterion, loader, epochs: int, proximal: ProximalTerm | None = None, *,
    device: torch.device, amp: bool = False,
) -> list[torch.Tensor]:
    """One mean loss per optimizer step (0-d tensors on ``device``: no host sync per step)."""
    module.train()
    losses: list[torch.Tensor] = []
    # A logical batch split into physical passes (BatchMemoryManager) makes the DP optimizer skip the step on all
    # but the last pass: its loss is the example-weighted mean of its passes, and FedProx acts once per real step.
    pending: list[tuple[torch.Tensor, int]] = []
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            # An empty Poisson batch is still a step of the mechanism (noise only): it goes through forward and
            # backward like any other so Opacus sees zero-row per-sample gradients and adds the noise.
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                loss = criterion(module(x), y)
            loss.backward()
            if amp:
                _upcast_grad_samples(optimizer)
            before = proximal.snapshot() if proximal is not None else None
            optimizer.step()
            if len(y):
                pending.append((loss.detach().double(), len(y)))
            if getattr(optimizer, "_is_last_step_skipped", False):
                continue
            if proximal is not None and before is not None:
                proximal.apply(before)
            if pending:
                losses.append(_weighted(pending))
                pending = []
    return losses


def _upcast_grad_samples(optimizer: torch.optim.Optimizer) -> None:
    """Per-example gradients computed under bf16 autocast are bf16; Opacus computes their norms in that dtype and
    only then casts them to the parameters' dtype to clip and sum them, so a clipped gradient measured up to 0.7%
    longer than the bound (hooks mode). Casting first makes the norm that of the very vector that is clipped."""
    for p in getattr(optimizer, "params", ()):
        sample = getattr(p, "grad_sample", None)
        if isinstance(sample, torch.Tensor) and sample.dtype != p.dtype:
            p.grad_sample = sample.to(p.dtype)
        elif isinstance(sample, list):
            p.grad_sample = [s.to(p.dtype) for s in sample]


def _weighted(parts: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0][0]
    total = sum(n for _, n in parts)
    return torch.stack([loss * (n / total) for loss, n in parts]).sum()


def mean_loss(losses: list[torch.Tensor]) -> float:
    return float(torch.stack(losses).mean()) if losses else float("nan")


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
    device: torch.device | str | None = None,
    amp: bool = False,
) -> LocalTrainResult:
    """Non-private baseline with the same expected batch size and step count as DP-SGD would use (and the same
    optional FedProx term). ``device`` and ``amp`` as in :func:`train_dp_sgd`."""
    device = place_model(model, device, loss_fn)
    steps_per_epoch = round(1 / sample_rate)
    proximal = ProximalTerm.for_model(model, mu=proximal_mu, lr=lr)
    batch_size = max(1, int(np.ceil(len(data) * sample_rate)))
    loader = ShuffledBatches(data, batch_size=batch_size, generator=generator)
    optimizer = PlainSGD(model.parameters(), lr=lr)
    with small_batch_kernels(device, batch_size * _row_elements(data), amp=amp):
        losses = run_epochs(model, optimizer, loss_fn, loader, epochs, proximal, device=device, amp=amp)
    return LocalTrainResult(mean_loss(losses), epochs * steps_per_epoch, ())


#: A batch whose input holds fewer elements than this runs its convolutions on PyTorch's native CPU kernels, not
#: oneDNN's (``torch.backends.mkldnn``). Measured on 1 thread, one SGD step (forward, backward, step), oneDNN /
#: native: fedshield's digits CNN (8x8 inputs) 622 / 408 us at 6 rows (384 elements), 730 / 583 at 14 rows, 749 /
#: 903 at 16 rows (1,024 elements); a 2-conv CNN on 28x28 inputs 1,200 / 1,257 us at 2 rows (1,568), and oneDNN
#: ahead from there on, as on 3x32x32 inputs; one row of the digits CNN ran the same on both (291 / 292 us). oneDNN's
#: set-up cost is what a handful of small rows (a cross-device client's, a simulated client's) cannot amortise.
SMALL_BATCH_ELEMENTS = 1024
_NATIVE_LOCK = threading.Lock()
_NATIVE_DEPTH: list[Any] = [0, True]  # blocks inside small_batch_kernels; the switch as the first one found it


def _row_elements(data: Dataset) -> int:
    return math.prod(data.x.shape[1:]) if data.x.ndim > 1 else 1


@contextmanager
def small_batch_kernels(device: torch.device, elements: int, *, amp: bool = False) -> Iterator[None]:
    """Inside, convolutions run on PyTorch's native kernels when ``device`` is a CPU and a batch's input holds
    fewer than :data:`SMALL_BATCH_ELEMENTS` elements (see there); otherwise, and under bf16 autocast (``amp``, whose
    CPU kernels are oneDNN's), nothing changes. PyTorch keeps the switch process-wide: it is off while any thread is
    inside such a block and restored when the last one leaves (the callers today run one at a time: a simulation's
    worker, a site's ClientApp or warm worker, the server's test thread). Both kernels compute the same
    convolution up to float rounding, so another thread's convolution meanwhile is only slower or faster."""
    if (amp or device.type != "cpu" or elements >= SMALL_BATCH_ELEMENTS
            or not torch.backends.mkldnn.is_available()):
        yield
        return
    with _NATIVE_LOCK:
        if _NATIVE_DEPTH[0] == 0:
            _NATIVE_DEPTH[1] = torch.backends.mkldnn.enabled  # not mkldnn.flags(): it sets TF32 too, with a warning
            torch.backends.mkldnn.enabled = False
        _NATIVE_DEPTH[0] += 1
    try:
        yield
    finally:
        with _NATIVE_LOCK:
            _NATIVE_DEPTH[0] -= 1
            if _NATIVE_DEPTH[0] == 0:
                torch.backends.mkldnn.enabled = _NATIVE_DEPTH[1]


class ShuffledBatches:
    """The batches ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True, generator=generator)`` yields, the
    same tensors in the same order, and the same draws from ``generator`` (so what draws from it next is unchanged):
    per pass its base seed, the permutation, and the empty permutation its sampler draws when exhausted.

    Why not the ``DataLoader``: it fetches one row at a time through the dataset and a collate function, which for the
    few rows of a simulated client costs as much as the training steps themselves (issue 13).
    """

    def __init__(self, data: Dataset, *, batch_size: int, generator: torch.Generator) -> None:
        if len(data) == 0:  # the DataLoader's sampler refuses an empty data set too
            raise DataError("this client has no training records: a site needs a data file with records; a "
                            "simulation needs at least one per client (fewer --clients, or another --partition)")
        self.x, self.y = torch.from_numpy(data.x), torch.from_numpy(data.y)
        self.batch_size, self.generator = batch_size, generator

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        torch.empty((), dtype=torch.int64).random_(generator=self.generator)  # the loader's base seed
        order = torch.randperm(n, generator=self.generator)
        for start in range(0, n, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]
        torch.randperm(n, generator=self.generator)  # RandomSampler's trailing, empty draw


class PlainSGD:
    """Plain SGD, ``w <- w - lr * grad``: the update ``torch.optim.SGD(params, lr)`` makes (its single-tensor path,
    bit for bit; ``tests/test_dpsgd.py``), without what comes with it.

    Why not ``torch.optim.SGD``: its ``step`` imports ``torch._dynamo`` on its first call (1.5-2 s of CPU in every
    process that trains, which on a small machine is most of a simulation's start) and juggles grad mode around
    each step for ``torch.compile``; non-private training needs neither. DP-SGD keeps Opacus' optimizer.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], *, lr: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, loss_fn: nn.Module, *, batch_size: int = 256, device: torch.device | str | None = None,
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` on ``data``, computed on ``device`` (as in :func:`train_dp_sgd`).

    ``batch_size`` 256, not 512: a batch's activations then stay in a CPU core's cache; the server's test of the
    digits CNN (359 images, after every round) took 3.3 ms of CPU instead of 4.2 (issue 13)."""
    device = place_model(model, device, loss_fn)
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
    with small_batch_kernels(device, min(batch_size, len(data)) * _row_elements(data)):
        _test_batches(model, x_all, y_all, loss_fn, batch_size, device, total_loss, correct)
    n = max(1, len(data))
    return float(total_loss) / n, int(correct) / n


def _test_batches(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, loss_fn: nn.Module, batch_size: int,
                  device: torch.device, total_loss: torch.Tensor, correct: torch.Tensor) -> None:
    for start in range(0, len(y_all), batch_size):
        x = x_all[start : start + batch_size].to(device, non_blocking=True)
        y = y_all[start : start + batch_size].to(device, non_blocking=True)
        logits = model(x)
        total_loss += loss_fn(logits, y).double() * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
