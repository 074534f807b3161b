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

from ..config import AMP_GRAD_SAMPLE_MODES
from ..dataspec import Dataset
from ..errors import PrivacyError
from .accounting import HistoryEntry
from .secure_noise import SecureGaussian, use_secure_noise

__all__ = [
    "LocalTrainResult", "ProximalTerm", "train_dp_sgd", "train_plain", "evaluate", "make_generator", "device_generator",
]


@dataclass(frozen=True)
class LocalTrainResult:
    mean_loss: float
    steps: int
    history: tuple[HistoryEntry, ...]  # empty for plain training
    secure_noise: bool = False  # the DP-SGD noise came from a CSPRNG (SecureGaussian), not torch's generator


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
    device: torch.device | str | None = None,
    max_physical_batch_size: int = 0,
    amp: bool = False,
    secure_noise: SecureGaussian | None = None,
) -> LocalTrainResult:
    """Train ``model`` in place with DP-SGD; ``steps = epochs * round(1 / sample_rate)``.

    ``secure_noise``: draw the Gaussian noise from this CSPRNG sampler (Opacus secure_mode's mitigation, see
    :mod:`.secure_noise`) instead of a torch generator seeded from ``generator``. Deployed sites must pass one;
    ``None`` (simulations, tests) keeps the noise reproducible from the seed, so its epsilon is nominal.

    ``proximal_mu > 0`` adds FedProx's ``mu/2 * ||w - w_start||^2`` (``w_start``: the weights ``model`` holds on
    entry, i.e. the global model) to the objective; see :class:`ProximalTerm` for how it stays out of the privacy
    mechanism.

    Hardware settings leave the mechanism (and so the returned ``history``) unchanged:
        device: where to train; ``model`` is moved there (``nn.Module.to``, in place) and stays there. ``None``:
            where its parameters already are. The data stays on the CPU; each batch is copied to ``device``.
            ``generator`` (a CPU generator) draws the Poisson sampling; on another device the noise comes from a
            generator on that device, seeded from ``generator``, so a seeded run stays reproducible.
        max_physical_batch_size: > 0 splits each Poisson batch into passes of at most this many examples
            (Opacus ``BatchMemoryManager``): clipped gradients are summed over the passes and noised once, so the
            steps, the noise and the parameters are those of the unsplit run (up to float summation order).
        amp: bf16 autocast for the forward pass and loss; per-example gradients are cast to the parameters'
            dtype (float32) before they are measured, clipped and noised. Only for the modes in
            :data:`fedshield.config.AMP_GRAD_SAMPLE_MODES`: ghost clipping under bf16 overshoots the bound.
        On CUDA, ghost clipping runs with TF32 off (see :func:`_exact_fp32`).
    """
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    if len(data) == 0:
        raise PrivacyError("cannot run DP-SGD on an empty data set")
    _check_hardware(grad_sample_mode, max_physical_batch_size, amp)
    device = _place(model, device, loss_fn)
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
            grad_sample_mode=grad_sample_mode, noise_generator=device_generator(generator, device),
        )
    if grad_sample_mode == "ghost":
        module, dp_optimizer, criterion, dp_loader = private
    else:
        module, dp_optimizer, dp_loader = private
        criterion = loss_fn
    if secure_noise is not None:
        use_secure_noise(dp_optimizer, secure_noise)
    # Opacus divides the noisy sum by int(len(data) * q), which is 0 below 1/q examples: every step would turn
    # the weights into inf/NaN. The divisor is post-processing (no privacy effect); 1 keeps the weights finite.
    dp_optimizer.expected_batch_size = max(1, dp_optimizer.expected_batch_size)
    with (
        _quiet_opacus(), _exact_fp32(device, grad_sample_mode),
        _physical_batches(dp_loader, dp_optimizer, max_physical_batch_size) as batches,
    ):
        losses = _run_epochs(module, dp_optimizer, criterion, batches, epochs, proximal, device=device, amp=amp)
    history = tuple((float(s), float(q), int(n)) for s, q, n in engine.accountant.history)
    expected = ((float(noise_multiplier), 1.0 / steps_per_epoch, epochs * steps_per_epoch),)
    if history != expected:
        raise PrivacyError(f"Opacus recorded {history}, expected {expected}: refusing to report a wrong epsilon")
    if hasattr(module, "_close"):
        module._close()  # remove Opacus hooks so the caller's model is an ordinary module again
    return LocalTrainResult(_mean(losses), epochs * steps_per_epoch, history, secure_noise is not None)


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
    device = _place(model, device, loss_fn)
    steps_per_epoch = round(1 / sample_rate)
    proximal = ProximalTerm.for_model(model, mu=proximal_mu, lr=lr)
    batch_size = max(1, int(np.ceil(len(data) * sample_rate)))
    loader = torch.utils.data.DataLoader(_tensor_dataset(data), batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = _run_epochs(model, optimizer, loss_fn, loader, epochs, proximal, device=device, amp=amp)
    return LocalTrainResult(_mean(losses), epochs * steps_per_epoch, ())


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` itself if it lives on ``device``'s kind of device, else a generator on ``device`` seeded
    from it (torch draws random numbers for a CUDA tensor only from a CUDA generator)."""
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _place(model: nn.Module, device: torch.device | str | None, loss_fn: nn.Module | None = None) -> torch.device:
    if device is None:
        first = next(model.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    if isinstance(loss_fn, nn.Module):
        loss_fn.to(device)  # e.g. class weights, a buffer of the loss
    return device


def _check_hardware(grad_sample_mode: str, max_physical_batch_size: int, amp: bool) -> None:
    if isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int) or max_physical_batch_size < 0:
        raise PrivacyError(f"max_physical_batch_size must be a whole number >= 0 (0: no cap), got {max_physical_batch_size!r}")
    if amp and grad_sample_mode not in AMP_GRAD_SAMPLE_MODES:
        raise PrivacyError(
            f"bf16 autocast (amp) keeps the clipping bound only with grad_sample_mode {' or '.join(AMP_GRAD_SAMPLE_MODES)}, "
            f"got {grad_sample_mode!r}: use one of those, or train without amp"
        )


@contextmanager
def _exact_fp32(device: torch.device, grad_sample_mode: str) -> Iterator[None]:
    """Full fp32 matmuls and convolutions on CUDA for ghost clipping, restored afterwards.

    Ghost clipping computes each example's gradient norm from activations and output gradients, then the clipped
    sum in a second backward pass. With TF32 (torch's default for cuDNN convolutions) the second pass rounds to
    10 mantissa bits, so a clipped contribution could exceed the bound the norms promised. The other modes clip
    the very per-example gradients they measure, so they keep the bound at any precision.
    """
    if device.type != "cuda" or grad_sample_mode != "ghost":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        saved = (matmul.allow_tf32, cudnn.allow_tf32)
        matmul.allow_tf32 = False
        try:
            cudnn.allow_tf32 = False
        except RuntimeError:
            matmul.allow_tf32 = saved[0]
            raise
    except RuntimeError as exc:  # flags set through both of torch's TF32 APIs, or frozen by disable_global_flags
        raise PrivacyError(
            f"cannot switch TF32 off for ghost clipping on {device}: {exc}. Set TF32 through one torch API only, "
            "or use grad_sample_mode hooks"
        ) from None
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@contextmanager
def _physical_batches(loader, optimizer, max_physical_batch_size: int):  # type: ignore[no-untyped-def]
    if not max_physical_batch_size:
        yield loader
        return
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=max_physical_batch_size, optimizer=optimizer
    ) as split:
        yield split


def _mean(losses: list[torch.Tensor]) -> float:
    return float(torch.stack(losses).mean()) if losses else float("nan")


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


def _run_epochs(  # type: ignore[no-untyped-def]
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


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, loss_fn: nn.Module, *, batch_size: int = 512, device: torch.device | str | None = None,
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` of ``model`` on ``data``, computed on ``device`` (as in :func:`train_dp_sgd`)."""
    device = _place(model, device, loss_fn)
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    x_all, y_all = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for start in range(0, len(data), batch_size):
        x = x_all[start : start + batch_size].to(device, non_blocking=True)
        y = y_all[start : start + batch_size].to(device, non_blocking=True)
        logits = model(x)
        total_loss += loss_fn(logits, y).double() * len(y)
        correct += (logits.argmax(dim=1) == y).sum()
    n = max(1, len(data))
    return float(total_loss) / n, int(correct) / n
