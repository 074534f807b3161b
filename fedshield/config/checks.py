"""Range checks shared by the run config and the round settings: validated to the maths, one-line errors."""

from __future__ import annotations

import math
import re
from typing import Any

from ..errors import ConfigError
from .names import AMP_GRAD_SAMPLE_MODES

__all__ = [
    "check_count_or_fraction", "check_hardware", "check_int", "count_or_fraction", "normalise_device_spec",
    "normalise_sample_rate",
]

_DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


def check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")


def normalise_device_spec(spec: Any) -> str:
    """``spec`` lower-cased and checked for spelling (``auto``, ``cpu``, ``cuda``, ``cuda:N``); whether the device
    exists is checked on the training machine by :func:`fedshield.device.resolve_device`."""
    text = spec.strip().lower() if isinstance(spec, str) else spec
    if not isinstance(text, str) or not _DEVICE_SPEC.fullmatch(text):
        raise ConfigError(
            f"device must be auto, cpu, cuda or cuda:N (N = GPU index, e.g. cuda:0), got {spec!r}: "
            "e.g. --device auto (a CUDA GPU if there is one, else the CPU)"
        )
    return text


def check_hardware(max_physical_batch_size: Any, amp: Any, grad_sample_mode: str, where: str) -> None:
    check_int(max_physical_batch_size, f"{where}max-physical-batch-size (0: no cap)", 0)
    if not isinstance(amp, bool):
        raise ConfigError(f"{where}amp must be true or false, got {amp!r}")
    if amp and grad_sample_mode not in AMP_GRAD_SAMPLE_MODES:
        why = (
            "Opacus's expanded weights do not support autocast" if grad_sample_mode == "ew" else
            "under bf16, ghost clipping measures each example's gradient norm in bf16 and clips in a separate pass, "
            "so clipped gradients came out up to 0.8% longer than max-grad-norm and epsilon would be understated"
        )
        raise ConfigError(
            f"{where}--amp (bf16 autocast) needs grad-sample-mode {' or '.join(AMP_GRAD_SAMPLE_MODES)}, got "
            f"{grad_sample_mode!r}: {why}. Add --grad-sample-mode hooks, or drop --amp"
        )


def check_count_or_fraction(value: float, name: str, *, min_count: int, example: str) -> None:
    ok = math.isfinite(value) and (0 < value <= 1 or (value >= min_count and float(value).is_integer()))
    if not ok:
        raise ConfigError(f"{name} must be a fraction in (0, 1] or a whole count >= {min_count}, got {value!r}: "
                          f"e.g. {example}")


def count_or_fraction(value: float) -> int | float:
    return int(value) if value > 1 else float(value)


def normalise_sample_rate(q: float) -> float:
    if not (0 < q <= 1):
        raise ConfigError(f"sample-rate must be in (0, 1], got {q}: e.g. 0.25 (4 DP-SGD steps per local epoch)")
    k = round(1 / q)
    if abs(q * k - 1) > 1e-3:
        lo, hi = max(1, math.floor(1 / q)), math.ceil(1 / q)
        raise ConfigError(
            f"sample-rate {q} is not 1/k for a whole number k of steps per local epoch: "
            f"use {1 / hi:.6g} (k={hi}) or {1 / lo:.6g} (k={lo})"
        )
    return 1.0 / k
