"""Checks of :class:`fedshield.strategies.secagg.SecAggPlus`'s protocol parameters, at construction time.

A bad value (a threshold above the shares, a modulus too small for two clients' sums) would otherwise surface as
a failed unmasking several rounds in; each check names the parameter and a value that works.
"""

from __future__ import annotations

import logging
import math

from ..compression import QUANT_BITS
from ..errors import ConfigError

__all__ = ["check_params", "check_bits"]

_log = logging.getLogger("fedshield.strategies.secagg")


def check_params(
    num_shares: object, threshold: object, clipping_range: object, quantization_range: object,
    modulus_range: object, max_weight: object, timeout: object,
) -> None:
    _check_count_or_fraction("num_shares", num_shares, min_int=3)
    _check_count_or_fraction("reconstruction_threshold", threshold, min_int=2)
    if isinstance(num_shares, int) and isinstance(threshold, int) and threshold > num_shares:
        raise ConfigError(f"reconstruction_threshold ({threshold}) must be <= num_shares ({num_shares}): lower "
                          "the threshold or give more shares")
    if isinstance(threshold, float) and threshold <= 0.5:
        _log.warning("reconstruction_threshold %s <= 0.5: a server that lies about which nodes dropped can "
                     "rebuild both secrets of a node and unmask it; use a fraction above 0.5", threshold)
    if clipping_range is not None:
        _check_positive_real("clipping_range", clipping_range, "e.g. 8.0, or None for the field's default")
    _check_positive_real("max_weight", max_weight, "the largest example count a client reports")
    if timeout is not None:
        _check_positive_real("timeout", timeout, "seconds, or None to wait without limit")
    if not _is_int(quantization_range) or not 2 <= quantization_range < 2**31:  # type: ignore[operator]
        raise ConfigError(f"quantization_range must be an int in [2, 2**31) (clients quantise to int32), got "
                          f"{quantization_range!r}: e.g. 2**22")
    if not _is_int(modulus_range) or modulus_range <= 0 or bin(modulus_range).count("1") != 1:  # type: ignore
        raise ConfigError(f"modulus_range must be a power of two, got {modulus_range!r}: e.g. 2**32")
    if not 2 * quantization_range < modulus_range <= 2**32:  # type: ignore[operator]
        raise ConfigError(f"modulus_range must be in (2 x quantization_range, 2**32] so that at least two "
                          f"clients' sums fit, got {modulus_range!r} with quantization_range "
                          f"{quantization_range!r}: e.g. 2**32 with 2**22 (up to 1023 nodes)")


def check_bits(value: object, name: str) -> int:
    if not _is_int(value) or value not in (0, *QUANT_BITS):
        raise ConfigError(f"{name} must be 0 (full precision) or one of {QUANT_BITS} bits per value, got {value!r}")
    return int(value)  # type: ignore[call-overload]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_count_or_fraction(name: str, value: object, *, min_int: int) -> None:
    if _is_int(value):
        if value < min_int:  # type: ignore[operator]
            raise ConfigError(f"{name} as a count must be >= {min_int}, got {value!r}: use a larger count, or a "
                              "fraction such as 1.0 (all sampled nodes)")
    elif isinstance(value, float):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{name} as a fraction must be in (0, 1], got {value!r}: e.g. 1.0 or 0.66")
    else:
        raise ConfigError(f"{name} must be an int count or a float fraction, got {type(value).__name__} {value!r}")


def _check_positive_real(name: str, value: object, hint: str) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}: {hint}")
