"""Property tests (hypothesis) of the small pieces every privacy and SecAgg+ guarantee rests on: an update clipped to
``C`` never has a norm above ``C`` and is only scaled; a sample rate is always turned into ``1/k`` for a whole
number of steps ``k`` (or refused); a SecAgg+ field is the smallest power of two whose sum of ``n`` clients' values
never wraps, and its wire type holds every masked value; any ``t`` Shamir shares, ours or Flower's, rebuild the
secret. Examples are few (the whole file runs in seconds) and have no deadline: the suite runs on a busy machine.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.common.secure_aggregation.crypto import shamir as flower_shamir
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedshield.compression import QUANT_BITS, secagg_field, wire_dtype
from fedshield.config import RunConfig
from fedshield.crypto import shamir
from fedshield.errors import ConfigError
from fedshield.privacy.client_level_mechanism import clip_update, update_norm

FINITE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)
SHAPES = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
UPDATES = st.dictionaries(
    st.sampled_from(["conv.weight", "conv.bias", "fc.weight", "fc.bias", "scale"]),
    st.one_of(arrays(np.float32, SHAPES, elements=FINITE), arrays(np.float64, SHAPES, elements=FINITE)),
    min_size=1, max_size=4,
)


@settings(max_examples=150)
@given(update=UPDATES, clip_norm=st.floats(1e-3, 1e4))
def test_a_clipped_update_never_exceeds_the_clip_norm_and_is_only_scaled(update: dict[str, np.ndarray],
                                                                         clip_norm: float) -> None:
    clipped, norm = clip_update(update, clip_norm=clip_norm)
    assert norm == pytest.approx(update_norm(update.values()), rel=1e-12)
    assert update_norm(clipped.values()) <= clip_norm  # exactly: the sensitivity bound must hold after rounding
    assert set(clipped) == set(update)
    for key, arr in update.items():
        assert clipped[key].shape == arr.shape and clipped[key].dtype == arr.dtype
    if norm <= clip_norm:
        for key, arr in update.items():  # under the bound: untouched
            np.testing.assert_array_equal(clipped[key], arr)
    else:  # over it: one common factor in (0, 1], so the direction is kept, and the norm lands on the bound
        assert update_norm(clipped.values()) == pytest.approx(clip_norm, rel=1e-5, abs=1e-30)
        scale = clip_norm / norm
        for key, arr in update.items():
            np.testing.assert_allclose(clipped[key], arr.astype(np.float64) * scale, rtol=1e-5,
                                       atol=float(np.finfo(arr.dtype).tiny) + clip_norm * 1e-6)


@settings(max_examples=100)
@given(k=st.integers(1, 1000), jitter=st.floats(-2e-4, 2e-4))  # 1/q within 0.2 of k
def test_a_sample_rate_near_one_over_k_becomes_exactly_one_over_k(k: int, jitter: float) -> None:
    q = (1 / k) * (1 + jitter)
    if not 0 < q <= 1:
        with pytest.raises(ConfigError, match="sample-rate must be in"):
            RunConfig(sample_rate=q)
        return
    config = RunConfig(sample_rate=q)
    assert config.sample_rate == 1.0 / k
    assert round(1 / config.sample_rate) == k  # a whole number of DP-SGD steps per local epoch


@settings(max_examples=100)
@given(q=st.floats(1e-4, 1.0, exclude_min=True))
def test_any_sample_rate_is_normalised_to_one_over_k_or_refused_with_both_neighbours(q: float) -> None:
    try:
        normalised = RunConfig(sample_rate=q).sample_rate
    except ConfigError as exc:
        lo, hi = max(1, math.floor(1 / q)), math.ceil(1 / q)
        assert f"(k={hi})" in str(exc) and f"(k={lo})" in str(exc) and "\n" not in str(exc)
        return
    k = round(1 / normalised)
    assert normalised == 1.0 / k and abs(q * k - 1) <= 1e-3


@settings(max_examples=100)
@given(bits=st.sampled_from(QUANT_BITS), clients=st.integers(2, 100_000))
def test_a_secagg_field_is_the_smallest_power_of_two_whose_sum_never_wraps(bits: int, clients: int) -> None:
    levels = 2**bits - 1
    if clients * levels >= 2**32:
        with pytest.raises(ConfigError, match="do not fit SecAgg\\+'s largest field"):
            secagg_field(bits, clients)
        return
    quantization_range, modulus = secagg_field(bits, clients)
    assert quantization_range == levels and modulus & (modulus - 1) == 0  # a power of two
    assert clients * levels < modulus <= 2 * clients * levels  # the sum fits; a smaller field would not
    assert modulus <= 2 ** (bits + math.ceil(math.log2(clients)))
    dtype = wire_dtype(modulus)
    assert modulus - 1 <= np.iinfo(dtype).max and (dtype.itemsize == 1 or modulus - 1 > np.iinfo(dtype).max >> (
        4 * dtype.itemsize))  # every masked value fits; the next narrower type would not
    sum_of_max = np.full(3, levels, dtype=np.int64) * clients
    assert np.array_equal(sum_of_max % modulus, sum_of_max)  # the worst-case sum reads back unwrapped


@settings(max_examples=40)
@given(secret=st.binary(min_size=0, max_size=48), num=st.integers(2, 12), data=st.data())
def test_any_threshold_of_shares_rebuilds_the_secret_in_both_implementations(secret: bytes, num: int,
                                                                             data: st.DataObject) -> None:
    threshold = data.draw(st.integers(1, num), label="threshold")
    ours = shamir.create_shares(secret, threshold, num)
    theirs = flower_shamir.create_shares(secret, threshold, num)
    for shares in (ours, theirs):
        pick = data.draw(st.permutations(range(num)), label="order")[:threshold]
        chosen = [shares[i] for i in pick]
        assert shamir.combine_shares(chosen) == secret
        assert flower_shamir.combine_shares(chosen) == secret
    if threshold >= 2 and secret:  # one share too few gives a different value or a refusal, never the secret
        try:
            assert shamir.combine_shares(ours[: threshold - 1]) != secret
        except ValueError:
            pass
