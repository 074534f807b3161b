"""Local DP-SGD through Opacus, over the same sampling and step loop as plain training (:mod:`fedshield.training`).

Privacy contract of :func:`train_dp_sgd`: each step samples every local example independently with probability
``sample_rate`` (Poisson), clips each per-example gradient to ``max_grad_norm`` and adds Gaussian noise of std
``noise_multiplier * max_grad_norm`` to their sum. The returned ``history`` is exactly what the accountant must be
fed. Using any other model, optimiser or data source than the ones passed in invalidates the guarantee.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..config import AMP_GRAD_SAMPLE_MODES
from ..dataspec import Dataset
from ..errors import PrivacyError
from ..training import LocalTrainResult, ProximalTerm, device_generator, mean_loss, place_model, run_epochs
from ..training import tensor_dataset
from .secure_noise import SecureGaussian, use_secure_noise

__all__ = ["train_dp_sgd"]


@contextmanager
def _quiet_opacus() -> Iterator[None]:
    # Opacus warns that secure_mode is off (fedshield documents its RNG choice in make_generator instead) and
    # torch warns about full backward hooks on the first layer, whose input needs no gradient: both expected.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*[Ff]ull backward hook.*")
        yield


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
    device = place_model(model, device, loss_fn)
    steps_per_epoch = round(1 / sample_rate)
    proximal = ProximalTerm.for_model(model, mu=proximal_mu, lr=lr)
    loader = DPDataLoader(tensor_dataset(data), sample_rate=sample_rate, generator=generator)
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
        losses = run_epochs(module, dp_optimizer, criterion, batches, epochs, proximal, device=device, amp=amp)
    history = tuple((float(s), float(q), int(n)) for s, q, n in engine.accountant.history)
    expected = ((float(noise_multiplier), 1.0 / steps_per_epoch, epochs * steps_per_epoch),)
    if history != expected:
        raise PrivacyError(f"Opacus recorded {history}, expected {expected}: refusing to report a wrong epsilon")
    if hasattr(module, "_close"):
        module._close()  # remove Opacus hooks so the caller's model is an ordinary module again
    return LocalTrainResult(mean_loss(losses), epochs * steps_per_epoch, history, secure_noise is not None)


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


