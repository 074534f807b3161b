"""Client-level DP: clipping invariants over shapes (0-d and empty included), the noise's distribution and variance,
accounting against independent computations, and both modes end to end with privacy.json reporting both
guarantees. The server wrapper, the client's share, FedProx and the report: ``test_client_dp_server.py``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from flwr.supercore.differential_privacy import compute_clip_model_update
from scipy import stats

from fedshield.config import RunConfig
from fedshield.errors import ConfigError, PrivacyError
from fedshield.privacy.client_level_mechanism import (
    SecureNormal,
    accounting_sample_rate,
    add_gaussian_noise,
    add_gaussian_noise_to,
    calibrate_client_noise,
    clip_update,
    clip_vector,
    client_level_epsilon,
    effective_noise_multiplier,
    noise_std_share,
    update_norm,
)
from fedshield.server.report import recompute_client_epsilon

import _sim_batch as sim_batch
from _client_dp_rounds import DELTA, gaussian_epsilon


# --- clipping -----------------------------------------------------------------------------------------------

SHAPE_SETS = [
    {"a": ()},
    {"a": (0,)},
    {"a": (7,)},
    {"a": (3, 4), "b": ()},
    {"a": (2, 3, 4), "b": (0, 5), "c": (), "d": (1,)},
]


def _update(shapes: dict[str, tuple[int, ...]], dtype: Any, scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: np.asarray(scale * rng.normal(size=s), dtype=dtype) for k, s in shapes.items()}


@pytest.mark.parametrize("shapes", SHAPE_SETS, ids=lambda s: ",".join(map(str, s.values())))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_clip_invariants(shapes: dict[str, tuple[int, ...]], dtype: Any, scale: float) -> None:
    clip = 0.5
    update = _update(shapes, dtype, scale)
    original = {k: v.copy() for k, v in update.items()}
    clipped, norm = clip_update(update, clip_norm=clip)
    for key, value in update.items():  # inputs untouched
        np.testing.assert_array_equal(value, original[key])
    assert set(clipped) == set(update)
    for key, value in clipped.items():
        assert isinstance(value, np.ndarray) and value.shape == update[key].shape and value.dtype == dtype, key
    assert norm == pytest.approx(update_norm(update.values()))
    new_norm = update_norm(clipped.values())
    assert new_norm <= clip  # the bound holds exactly, after rounding to the dtype
    if norm > clip:
        tolerance = 2e-3 if dtype == np.float16 else 1e-6
        assert new_norm == pytest.approx(clip, rel=tolerance)  # clipped norm equals the bound
        factor = clip / norm  # the direction is kept: every entry is scaled by the same factor
        for key in update:
            np.testing.assert_allclose(clipped[key], update[key].astype(np.float64) * factor,
                                       rtol=tolerance * 5, atol=1e-7)
    else:
        for key in update:
            np.testing.assert_array_equal(clipped[key], update[key])


def test_a_0d_entry_is_clipped_where_flower_leaves_it() -> None:
    """Flower 1.39's compute_clip_model_update rebinds 0-d results instead of scaling them: documented here."""
    glob = [np.asarray(0.0, dtype=np.float32), np.zeros(3, dtype=np.float32)]
    local = [np.asarray(100.0, dtype=np.float32), np.full(3, 100.0, dtype=np.float32)]
    flower = [x.copy() for x in local]
    compute_clip_model_update(flower, glob, 1.0)
    assert float(flower[0]) == 100.0  # Flower: unclipped (the 0-d update escaped the scaling)
    ours, _ = clip_update({"s": local[0] - glob[0], "v": local[1] - glob[1]}, clip_norm=1.0)
    assert float(ours["s"]) == pytest.approx(0.5, rel=1e-6)
    assert update_norm(ours.values()) <= 1.0


def test_clip_rejects_what_it_cannot_clip() -> None:
    with pytest.raises(PrivacyError, match="NaN or infinity"):
        clip_update({"a": np.array([1.0, np.nan])}, clip_norm=1.0)
    with pytest.raises(PrivacyError, match="only floating-point"):
        clip_update({"a": np.array([1, 2])}, clip_norm=1.0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="clip norm must be a finite number > 0"):
            clip_update({"a": np.ones(2)}, clip_norm=bad)


@pytest.mark.parametrize("size", [0, 1, 7, 6090, 100_003])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e150])
def test_the_flat_clip_keeps_the_bound_and_agrees_with_the_per_tensor_one(size: int, scale: float) -> None:
    """The server clips each reply as one flat vector (``clip_vector``): the bound holds exactly, the direction is
    kept, and it is the per-tensor clip of the same update up to float rounding."""
    clip = 0.5
    vector = scale * np.random.default_rng(size).normal(size=size)
    original = vector.copy()
    clipped, norm = clip_vector(vector, clip_norm=clip)
    np.testing.assert_array_equal(vector, original)  # input untouched
    assert clipped.dtype == np.float64 and clipped.shape == (size,)
    assert math.sqrt(float(np.dot(clipped, clipped))) <= clip
    per_tensor, per_norm = clip_update({"a": vector[: size // 3], "b": vector[size // 3:]}, clip_norm=clip)
    assert norm == pytest.approx(per_norm, rel=1e-12)
    np.testing.assert_allclose(clipped, np.concatenate([per_tensor["a"], per_tensor["b"]]), rtol=1e-6, atol=0)
    if norm <= clip:
        assert clipped is vector  # nothing to scale: no copy


def test_the_flat_clip_rejects_what_it_cannot_clip() -> None:
    with pytest.raises(PrivacyError, match="NaN or infinity"):
        clip_vector(np.array([1.0, np.inf]), clip_norm=1.0)
    with pytest.raises(PrivacyError, match="flat float64"):
        clip_vector(np.ones(3, dtype=np.float32), clip_norm=1.0)
    with pytest.raises(PrivacyError, match="flat float64"):
        clip_vector(np.ones((2, 2)), clip_norm=1.0)
    with pytest.raises(ConfigError, match="clip norm must be a finite number > 0"):
        clip_vector(np.ones(2), clip_norm=0.0)


# --- noise ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 6, 7, 20])
def test_noise_added_in_place_is_every_draw_in_order_across_chunks(size: int) -> None:
    """The server noises its sum in place, a chunk of draws at a time: every entry gets exactly one draw, in order,
    as one draw of the whole vector would give (same seeded source), whatever the chunk boundaries."""
    vector = np.arange(size, dtype=np.float64)
    add_gaussian_noise_to(vector, std=2.0, source=np.random.default_rng(5), chunk=3)
    want = np.arange(size, dtype=np.float64) + 2.0 * np.random.default_rng(5).standard_normal(size)
    np.testing.assert_array_equal(vector, want)
    with pytest.raises(PrivacyError, match="flat float64"):
        add_gaussian_noise_to(np.zeros(3, dtype=np.float32), std=1.0, source=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="noise std"):
        add_gaussian_noise_to(np.zeros(3), std=-1.0, source=np.random.default_rng(0))


def test_secure_normal_shapes_and_source(monkeypatch: pytest.MonkeyPatch) -> None:
    source = SecureNormal()
    for shape in [(), (0,), (1,), (5,), (3, 4), (2, 3, 5)]:
        draw = source.standard_normal(shape)
        assert isinstance(draw, np.ndarray) and draw.shape == shape and draw.dtype == np.float64
    assert source.standard_normal(7).shape == (7,)
    calls: list[int] = []
    real = SecureNormal._keystream

    def counting(self: SecureNormal, n: int) -> bytes:
        calls.append(n)
        return real(self, n)

    monkeypatch.setattr(SecureNormal, "_keystream", counting)
    source.standard_normal((3 * 2**20 + 5,))
    # Chunked ChaCha20 keystream: 4 normals per output (secure_mode's mitigation), 16 bytes per pair of normals.
    assert calls == [32 * 2**20] * 3 + [32 * 5]
    a, b = source.standard_normal((1000,)), source.standard_normal((1000,))
    assert not np.array_equal(a, b)


def test_secure_normal_is_standard_normal() -> None:
    n = 400_000
    x = SecureNormal().standard_normal((n,))
    assert abs(x.mean()) < 5 / math.sqrt(n)
    assert abs(x.var() - 1.0) < 5 * math.sqrt(2 / n)  # sd of a sample variance of N(0,1) is sqrt(2/n)
    assert stats.kstest(x, "norm").pvalue > 1e-4
    assert abs(stats.skew(x)) < 5 * math.sqrt(6 / n) and abs(stats.kurtosis(x)) < 5 * math.sqrt(24 / n)


@pytest.mark.parametrize("source", [SecureNormal(), np.random.default_rng(5)], ids=["csprng", "generator"])
def test_noise_variance_is_sigma_squared_c_squared(source: Any) -> None:
    """Measured noise variance matches (z C)^2 within the sampling tolerance, 0-d entries included."""
    z, clip = 1.3, 0.7
    std = z * clip
    arrays = {"big": np.zeros(200_000, dtype=np.float32), "scalar": np.asarray(0.0, dtype=np.float64)}
    noisy = add_gaussian_noise(arrays, std=std, source=source)
    assert noisy["scalar"].shape == () and noisy["big"].dtype == np.float32
    assert np.all(arrays["big"] == 0) and float(arrays["scalar"]) == 0.0  # not mutated
    var = float(np.var(noisy["big"].astype(np.float64)))
    assert abs(var / std**2 - 1) < 5 * math.sqrt(2 / 200_000)
    scalars = np.array([float(add_gaussian_noise({"s": np.asarray(0.0)}, std=std, source=source)["s"])
                        for _ in range(4000)])
    assert abs(scalars.var() / std**2 - 1) < 5 * math.sqrt(2 / 4000)


def test_noise_arguments_are_checked() -> None:
    with pytest.raises(ConfigError, match="noise std"):
        add_gaussian_noise({"a": np.zeros(2)}, std=-1.0, source=SecureNormal())
    with pytest.raises(PrivacyError, match="floating point"):
        add_gaussian_noise({"a": np.zeros(2, dtype=np.int32)}, std=1.0, source=SecureNormal())
    assert noise_std_share(noise_multiplier=2.0, clip_norm=0.5, expected_clients=4) == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        noise_std_share(noise_multiplier=2.0, clip_norm=0.5, expected_clients=0)


# --- accounting -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 20), (1.5, 5), (3.0, 100)])
def test_fixed_size_sampling_epsilon_equals_the_exact_gaussian_composition(z: float, rounds: int) -> None:
    ours = client_level_epsilon([(z, 1.0, rounds)], delta=DELTA)
    assert ours == pytest.approx(gaussian_epsilon(math.sqrt(rounds) / z, DELTA), abs=0.02)


def test_dropout_rounds_compose_like_the_exact_computation() -> None:
    history = [(1.2, 1.0, 10), (1.2 * math.sqrt(3 / 4), 1.0, 2), (1.2, 1.0, 3)]
    mu = math.sqrt(sum(n / z**2 for z, _, n in history))
    assert client_level_epsilon(history, delta=DELTA) == pytest.approx(gaussian_epsilon(mu, DELTA), abs=0.02)


@pytest.mark.parametrize(("z", "q", "rounds"), [(1.1, 0.25, 40), (0.9, 0.5, 20), (2.0, 0.1, 300)])
def test_poisson_sampling_epsilon_agrees_with_microsoft_prv_accountant(z: float, q: float, rounds: int) -> None:
    prv = pytest.importorskip("prv_accountant", reason="independent accountant: pip install prv-accountant")
    mech = prv.PoissonSubsampledGaussianMechanism(noise_multiplier=z, sampling_probability=q)
    acc = prv.PRVAccountant(prvs=mech, max_self_compositions=rounds, eps_error=0.01, delta_error=1e-10)
    low, _, high = acc.compute_epsilon(delta=DELTA, num_self_compositions=rounds)
    ours = client_level_epsilon([(z, q, rounds)], delta=DELTA)
    assert low - 0.02 <= ours <= high + 0.02
    # Amplification is real: the same z at q = 1 costs far more.
    assert client_level_epsilon([(z, 1.0, rounds)], delta=DELTA) > 1.5 * ours
    # And the RDP accountant is an upper bound.
    assert client_level_epsilon([(z, q, rounds)], delta=DELTA, accountant="rdp") >= ours - 0.02


def test_calibration_lands_under_the_client_level_target() -> None:
    for q, rounds in [(1.0, 10), (0.2, 50)]:
        z = calibrate_client_noise(target_epsilon=4.0, delta=DELTA, sample_rate=q, rounds=rounds)
        assert 3.9 <= client_level_epsilon([(z, q, rounds)], delta=DELTA) <= 4.0
        assert client_level_epsilon([(z, q, rounds + 2)], delta=DELTA) > 4.0


def test_sampling_rates_and_effective_noise() -> None:
    assert accounting_sample_rate(sampling="fixed", fraction=0.1) == 1.0  # no amplification claimed
    assert accounting_sample_rate(sampling="poisson", fraction=0.1) == 0.1
    with pytest.raises(ConfigError):
        accounting_sample_rate(sampling="shuffle", fraction=0.1)
    assert effective_noise_multiplier(noise_multiplier=2.0, expected_clients=8, included_clients=2) == pytest.approx(1.0)
    assert effective_noise_multiplier(noise_multiplier=2.0, expected_clients=8, included_clients=12) == 2.0


# --- end to end: both modes, both guarantees in privacy.json --------------------------------------------------


E2E_COMMON = dict(task="digits", num_clients=4, num_rounds=2, local_epochs=1, epsilon=8.0, client_clip_norm=1.0)
E2E_RUNS = {
    "central": dict(client_dp="central", client_noise_multiplier=0.8, secagg=False),
    "distributed": dict(client_dp="distributed", client_epsilon=6.0, secagg=True),
    "poisson": dict(client_dp="central", client_noise_multiplier=0.8, secagg=False, fraction_train=0.5,
                    client_sampling="poisson"),
}
for _name, _changes in E2E_RUNS.items():  # in the shared simulation of the other 4-client tests (one Ray start)
    sim_batch.register(f"client_dp/{_name}", lambda root, n=_name, c=_changes: RunConfig(
        **E2E_COMMON, **c, out=root / f"client_dp-{n}"), clients=4)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client_dp_runs(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, RunConfig]:
    return sim_batch.results(tmp_path_factory, clients=4).view("client_dp/")


@pytest.mark.usefixtures("no_leftover_processes")
@sim_batch.TIMEOUT
def test_client_level_dp_end_to_end_reports_both_guarantees(client_dp_runs: Mapping[str, RunConfig]) -> None:
    configs = [client_dp_runs[name] for name in E2E_RUNS]
    for cfg in configs:
        privacy = json.loads((cfg.out / "privacy.json").read_text())
        rows = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
        trained = sum(r["clients_trained"] for r in rows)
        # Poisson sampling (q 0.5, 4 clients, 2 rounds) samples nobody in either round once in 256 runs: then no
        # record was used and epsilon is exactly 0; otherwise it must be positive and within the budget.
        assert privacy["guarantee"]["level"] == "record", privacy["guarantee"]
        assert (0 < privacy["guarantee"]["epsilon"] <= 8.0) if trained else privacy["guarantee"]["epsilon"] == 0, (
            cfg.client_sampling, privacy["guarantee"], rows)
        section = privacy["client_level"]
        assert section["enabled"] and section["mode"] == cfg.client_dp and section["clip_norm"] == 1.0
        assert section["epsilon"] == pytest.approx(recompute_client_epsilon(section), rel=1e-9)
        if cfg.client_sampling == "fixed":
            assert section["rounds_released"] == 2 and all(r["clients_trained"] == 4 for r in rows), rows
            mu = math.sqrt(sum(n / z**2 for z, _, n in section["history"]))
            assert section["epsilon"] == pytest.approx(gaussian_epsilon(mu, cfg.delta), abs=0.02)
        else:
            assert section["sample_rate"] == 0.5 and section["expected_clients"] == 2.0
            # Every round is a release, also one whose Poisson draw took nobody (noise alone, 1/16 per round here):
            # skipping it would reveal the empty draw.
            assert section["rounds_released"] == len(rows) == 2, rows
    distributed = json.loads((client_dp_runs["distributed"].out / "privacy.json").read_text())["client_level"]
    assert 5.9 <= distributed["epsilon"] <= 6.0  # calibrated for the 2 planned rounds, all 4 clients replied
    assert distributed["noise_multiplier"] == pytest.approx(distributed["history"][0][0])
