"""Client-level differential privacy as pure functions: clip an update, add Gaussian noise, account over rounds.

Client-level DP protects whether a whole client (all of its records) took part in the run. The mechanism is
DP-FedAvg (McMahan et al., "Learning Differentially Private Recurrent Language Models", 2018): each client's
update ``w_local - w_global`` is clipped to L2 norm ``C``, and Gaussian noise of std ``z * C`` is added to the SUM of
the clipped updates, once per round. Accounting is the sampled Gaussian mechanism run once per round, so the whole
run is ``epsilon([(z, q, rounds)], delta)`` with the same accountants as record-level DP-SGD
(:mod:`fedshield.privacy.accounting`).

Nothing here mutates its inputs but :func:`add_gaussian_noise_to`, which adds noise in place to a flat vector its
caller owns (the server's running sum). In-place NumPy on a 0-d array rebinds a name instead of writing into the
array (Flower 1.39's ``compute_clip_model_update`` leaves 0-d entries unclipped this way), so every operation on a
model's arrays below is out-of-place and checked on 0-d shapes by the tests.

Randomness. Noise that protects people must not be predictable. :class:`SecureNormal` (an alias of
:class:`~fedshield.privacy.secure_noise.SecureGaussian`) draws from a ChaCha20 keystream keyed from ``os.urandom``
through the Box-Muller transform, with Opacus secure_mode's sum-of-four mitigation. A ``numpy.random.Generator``
seeded from ``os.urandom`` is *not* a CSPRNG (PCG64's state can be recovered
from its output), so it is used only where reproducibility is the point (simulations, tests): every noise function
takes the source as an argument. Known limits of floating-point Gaussian sampling apply (Mironov, CCS 2012, showed
attacks on the low-order bits of floating-point Laplace noise; the sum-of-four mitigation raises their cost, a
discrete Gaussian would close them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError, PrivacyError
from .accounting import calibrate_noise_multiplier, compact_history, epsilon
from .secure_noise import SecureGaussian

__all__ = [
    "NormalSource",
    "SecureNormal",
    "update_norm",
    "clip_update",
    "clip_vector",
    "add_gaussian_noise",
    "add_gaussian_noise_to",
    "noise_std_share",
    "effective_noise_multiplier",
    "accounting_sample_rate",
    "check_shares_fit",
    "SHARE_SIGMAS",
    "client_level_epsilon",
    "calibrate_client_noise",
]

Arrays = Mapping[str, NDArray[Any]]


class NormalSource(Protocol):
    """Anything with ``standard_normal(shape)``: :class:`SecureNormal`, or a seeded ``numpy.random.Generator``."""

    def standard_normal(self, size: tuple[int, ...]) -> Any: ...


#: Client-level DP noise uses the same CSPRNG sampler as DP-SGD (ChaCha20, Opacus secure_mode's mitigation).
SecureNormal = SecureGaussian


def update_norm(arrays: Iterable[NDArray[Any]]) -> float:
    """L2 norm of all entries of ``arrays`` taken together, accumulated in float64."""
    total = 0.0
    for arr in arrays:
        flat = np.asarray(arr, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_update(update: Arrays, *, clip_norm: float) -> tuple[dict[str, NDArray[Any]], float]:
    """Scale ``update`` so that its L2 norm is at most ``clip_norm``; return ``(clipped, norm before clipping)``.

    Every array keeps its shape (0-d included) and dtype. Scaling happens in float64 and is rounded to the
    array's dtype; if rounding pushed the norm a hair above ``clip_norm``, the scale is nudged down so the bound
    holds exactly, as the sensitivity analysis needs.

    Raises:
        ConfigError: ``clip_norm`` is not a finite number > 0.
        PrivacyError: an array is not floating point, or the update holds NaN or infinity (it cannot be clipped).
    """
    if not (isinstance(clip_norm, (int, float)) and clip_norm > 0 and math.isfinite(clip_norm)):
        raise ConfigError(f"clip norm must be a finite number > 0, got {clip_norm!r}")
    for key, arr in update.items():
        if not np.issubdtype(np.asarray(arr).dtype, np.floating):
            raise PrivacyError(f"update entry {key!r} has dtype {np.asarray(arr).dtype}; only floating-point "
                               "updates can be clipped: leave integer buffers out of the update")
    norm = update_norm(update.values())
    if not math.isfinite(norm):
        raise PrivacyError("the update holds NaN or infinity, so it cannot be clipped; reject it instead")
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = _scaled(update, scale)
    while scale < 1.0 and update_norm(clipped.values()) > clip_norm:
        scale = float(np.nextafter(scale * (1 - 1e-7), 0.0))
        clipped = _scaled(update, scale)
    return clipped, norm


def clip_vector(vector: NDArray[np.float64], *, clip_norm: float) -> tuple[NDArray[np.float64], float]:
    """:func:`clip_update` for one flat float64 vector: ``(clipped, norm before clipping)``, a new array when scaled.

    Why a flat form: the server clips every reply of every round, and per-array NumPy calls (a norm, a scale and a
    check for each of a model's tensors) cost more than the arithmetic on a small model (issue 13). The guarantee is
    :func:`clip_update`'s: the returned vector's norm, computed the same way, never exceeds ``clip_norm``.

    Raises:
        ConfigError: ``clip_norm`` is not a finite number > 0.
        PrivacyError: ``vector`` is not float64, or holds NaN or infinity.
    """
    if not (isinstance(clip_norm, (int, float)) and clip_norm > 0 and math.isfinite(clip_norm)):
        raise ConfigError(f"clip norm must be a finite number > 0, got {clip_norm!r}")
    if vector.dtype != np.float64 or vector.ndim != 1:
        raise PrivacyError(f"clip_vector takes a flat float64 vector, got {vector.dtype} of shape {vector.shape}")
    norm = math.sqrt(float(np.dot(vector, vector)))
    if not math.isfinite(norm):
        raise PrivacyError("the update holds NaN or infinity, so it cannot be clipped; reject it instead")
    if norm <= clip_norm:
        return vector, norm
    scale = clip_norm / norm
    clipped = vector * scale
    while math.sqrt(float(np.dot(clipped, clipped))) > clip_norm:
        scale = float(np.nextafter(scale * (1 - 1e-7), 0.0))
        clipped = vector * scale
    return clipped, norm


def _scaled(update: Arrays, scale: float) -> dict[str, NDArray[Any]]:
    out: dict[str, NDArray[Any]] = {}
    for key, arr in update.items():
        src = np.asarray(arr)
        out[key] = np.asarray(np.multiply(src, scale, dtype=np.float64), dtype=src.dtype)
    return out


def add_gaussian_noise(arrays: Arrays, *, std: float, source: NormalSource) -> dict[str, NDArray[Any]]:
    """New arrays: each entry plus independent N(0, std^2) noise from ``source``, in the entry's dtype.

    Every floating-point array gets noise, 0-d and empty ones included.

    Raises:
        ConfigError: ``std`` is negative or not finite.
        PrivacyError: an array is not floating point (integer entries cannot carry Gaussian noise).
    """
    if not (isinstance(std, (int, float)) and std >= 0 and math.isfinite(std)):
        raise ConfigError(f"noise std must be a finite number >= 0, got {std!r}")
    out: dict[str, NDArray[Any]] = {}
    for key, arr in arrays.items():
        src = np.asarray(arr)
        if not np.issubdtype(src.dtype, np.floating):
            raise PrivacyError(f"entry {key!r} has dtype {src.dtype}; Gaussian noise needs floating point")
        noise = np.asarray(source.standard_normal(src.shape), dtype=np.float64)
        out[key] = np.asarray(src.astype(np.float64) + std * noise, dtype=src.dtype)
    return out


def add_gaussian_noise_to(vector: NDArray[np.float64], *, std: float, source: NormalSource,
                          chunk: int = 1 << 20) -> None:
    """Add independent N(0, std^2) noise from ``source`` to every entry of the flat float64 ``vector``, in place,
    ``chunk`` draws at a time.

    Why in place: the server's noisy sum of a large model (100M parameters) would otherwise hold the noise, a copy of
    the sum and the result at once, 2.4 GB of float64 where one chunk's draws suffice.

    Raises:
        ConfigError: ``std`` is negative or not finite.
        PrivacyError: ``vector`` is not a flat float64 vector.
    """
    if not (isinstance(std, (int, float)) and std >= 0 and math.isfinite(std)):
        raise ConfigError(f"noise std must be a finite number >= 0, got {std!r}")
    if vector.dtype != np.float64 or vector.ndim != 1:
        raise PrivacyError(f"add_gaussian_noise_to takes a flat float64 vector, got {vector.dtype} of shape "
                           f"{vector.shape}")
    for start in range(0, vector.size, chunk):
        part = vector[start : start + chunk]
        part += std * np.asarray(source.standard_normal(part.shape), dtype=np.float64)


def noise_std_share(*, noise_multiplier: float, clip_norm: float, expected_clients: float) -> float:
    """Std of the noise ONE client adds in distributed mode: ``z * C / sqrt(n)``.

    ``n`` independent shares sum to noise of std ``z * C`` on the sum of the updates: the central mechanism's.
    ``n`` is the fixed sample size, or the Poisson mean ``q N`` (not necessarily whole).
    """
    _check_positive("noise multiplier", noise_multiplier)
    _check_positive("clip norm", clip_norm)
    _check_positive("expected clients per round", expected_clients)
    return noise_multiplier * clip_norm / math.sqrt(expected_clients)


def effective_noise_multiplier(*, noise_multiplier: float, expected_clients: float, included_clients: float) -> float:
    """The noise multiplier actually in a distributed round's sum when ``included_clients`` of the expected replied.

    Each share has std ``z C / sqrt(n)``; ``m`` shares sum to std ``z C sqrt(m / n)``. Fewer replies mean less
    noise, so the round is accounted at ``z * sqrt(m / n)``. More replies than expected (Poisson sampling) add
    noise, which is not credited: the result never exceeds ``z`` (conservative).
    """
    if expected_clients <= 0:
        raise ConfigError(f"expected clients must be > 0, got {expected_clients}")
    if included_clients < 0:
        raise ConfigError(f"included clients must be >= 0, got {included_clients}")
    return noise_multiplier * math.sqrt(min(1.0, included_clients / expected_clients))


def accounting_sample_rate(*, sampling: str, fraction: float) -> float:
    """The client sampling rate the accountant may use.

    ``poisson``: every client joins a round independently with probability ``fraction``: amplification by
    subsampling applies with ``q = fraction`` (expected clients / total), add/remove adjacency. ``fixed``: a
    fixed-size sample without replacement, which Opacus' accountants (Poisson, add/remove) do not cover: accounted
    as ``q = 1`` (no amplification) under ZERO-OUT adjacency (one client's update replaced by zero; the sample and
    its size unchanged), where the sum's sensitivity is C. It is not an add/remove bound: adding a client to the
    population changes who fills a fixed-size sample (a substitution, sensitivity 2C).
    """
    if sampling == "fixed":
        return 1.0
    if sampling == "poisson":
        if not (0 < fraction <= 1):
            raise ConfigError(f"Poisson client sampling needs a rate in (0, 1], got {fraction}")
        return float(fraction)
    raise ConfigError(f"unknown client sampling {sampling!r}: choose fixed or poisson")


#: Standard deviations of a noise share that must fit inside SecAgg+'s clipping range: a share entry is clipped
#: with probability 2 * Phi(-7) = 2.6e-12, so the summed noise stays the accounted Gaussian.
SHARE_SIGMAS = 7.0


def check_shares_fit(*, clipping_range: float, clip_norm: float, noise_multiplier: float, expected_clients: float) -> None:
    """Refuse a distributed client-level DP run whose noise shares SecAgg+ would clip before summing them.

    An entry a client masks is its clipped update entry (at most ``C`` in absolute value) plus its noise share
    (std ``z C / sqrt(n)``), times weight 1 / max_weight 1. Clipping it to +-``clipping_range`` would cut the
    noise entry by entry (C = 20, z = 1, n = 5: 37% of the entries), so the sum would carry less noise than is
    accounted. Required: ``C + SHARE_SIGMAS * z C / sqrt(n) <= clipping_range``.

    Raises:
        ConfigError: one line with the largest clip norm that fits.
    """
    share = noise_std_share(noise_multiplier=noise_multiplier, clip_norm=clip_norm, expected_clients=expected_clients)
    needed = clip_norm + SHARE_SIGMAS * share
    if needed > clipping_range:
        fit = clipping_range / (1 + SHARE_SIGMAS * noise_multiplier / math.sqrt(expected_clients))
        raise ConfigError(
            f"client-dp distributed: an update entry plus {SHARE_SIGMAS:g} std of its noise share "
            f"({clip_norm:g} + {SHARE_SIGMAS:g} x {share:.4g} = {needed:.4g}) exceeds SecAgg+'s clipping range "
            f"+-{clipping_range:g}, which would clip the noise: lower --client-clip-norm to at most {fit:.4g}, "
            "or sample more clients per round"
        )


def client_level_epsilon(history: Iterable[Sequence[float]], *, delta: float, accountant: str = "prv") -> float:
    """Epsilon of the client-level history ``[(z, q, rounds), ...]``; q = 1 is the unamplified Gaussian (the
    accountant silences Opacus' harmless warnings about q = 1 itself, under its lock)."""
    return epsilon(compact_history(history), delta=delta, accountant=accountant)


def calibrate_client_noise(
    *, target_epsilon: float, delta: float, sample_rate: float, rounds: int, accountant: str = "prv"
) -> float:
    """The smallest z whose ``rounds`` releases at client sampling rate ``sample_rate`` stay within the target.

    Calibrate once for the planned run: that horizon is what the guarantee is stated for.
    """
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=rounds, accountant=accountant
    )


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
