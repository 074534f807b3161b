"""Client-level DP: clipping invariants over shapes (0-d and empty included), the noise's distribution and variance,
accounting against independent computations, the server wrapper's arithmetic, the client's noise share, FedProx's
proximal term, and both modes end to end with privacy.json reporting both guarantees."""

from __future__ import annotations

import json
import math
import random
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg
from flwr.supercore.differential_privacy import compute_clip_model_update
from flwr.supercore.task_identity import TaskIdentity
from scipy import optimize, stats

from fedshield import protocol as P
from fedshield.client.site import Site
from fedshield.client.trainer import train_round
from fedshield.config import RoundSettings, RunConfig
from fedshield.dataspec import Dataset
from fedshield.errors import ConfigError, PrivacyError
from fedshield.privacy.client_level_mechanism import (
    SecureNormal,
    accounting_sample_rate,
    add_gaussian_noise,
    calibrate_client_noise,
    clip_update,
    client_level_epsilon,
    effective_noise_multiplier,
    noise_std_share,
    update_norm,
)
from fedshield.training import make_generator, train_plain
from fedshield.server.report import PrivacyReport, recompute_client_epsilon
from fedshield.strategies.client_level_dp import ClientLevelDP, ReleaseEvent
from fedshield.tasks import get_task

from _grid import FakeGrid

DELTA = 1e-5

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


# --- noise ---------------------------------------------------------------------------------------------------


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


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a mu-GDP mechanism (Dong, Roth & Su 2019): delta(eps) = Phi(-eps/mu + mu/2) -
    e^eps Phi(-eps/mu - mu/2). R unsampled Gaussian releases with multipliers z_r are mu-GDP, mu^2 = sum 1/z_r^2."""
    def gap(eps: float) -> float:
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return float(optimize.brentq(gap, 0.0, 500.0))


@pytest.mark.parametrize(("z", "rounds"), [(1.0, 20), (1.5, 5), (3.0, 100)])
def test_fixed_size_sampling_epsilon_equals_the_exact_gaussian_composition(z: float, rounds: int) -> None:
    ours = client_level_epsilon([(z, 1.0, rounds)], delta=DELTA)
    assert ours == pytest.approx(_gaussian_epsilon(math.sqrt(rounds) / z, DELTA), abs=0.02)


def test_dropout_rounds_compose_like_the_exact_computation() -> None:
    history = [(1.2, 1.0, 10), (1.2 * math.sqrt(3 / 4), 1.0, 2), (1.2, 1.0, 3)]
    mu = math.sqrt(sum(n / z**2 for z, _, n in history))
    assert client_level_epsilon(history, delta=DELTA) == pytest.approx(_gaussian_epsilon(mu, DELTA), abs=0.02)


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


# --- the server wrapper ----------------------------------------------------------------------------------------




class ZeroNoise:
    def standard_normal(self, size: Any) -> np.ndarray:
        return np.zeros(size)


GLOBAL = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "s": np.asarray(0.25, dtype=np.float64),
          "count": np.asarray([3], dtype=np.int64)}


def _configure(strategy: ClientLevelDP, n: int) -> list[Message]:
    arrays = ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})
    msgs = list(strategy.configure_train(1, arrays, ConfigRecord({}), FakeGrid(n)))
    for m in msgs:
        m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    return msgs


def _reply(msg: Message, update: dict[str, np.ndarray], weight: float = 1.0) -> Message:
    model = {k: np.asarray(GLOBAL[k] + update.get(k, 0), dtype=GLOBAL[k].dtype) for k in GLOBAL}
    return Message(RecordDict({P.ARRAYS: ArrayRecord({k: Array(v) for k, v in model.items()}),
                               P.METRICS: MetricRecord({P.NUM_EXAMPLES: weight, "train-loss": 0.5})}), reply_to=msg)


def _updates(n: int, scale: float) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    return [{"w": scale * rng.normal(size=(3, 4)), "s": np.asarray(scale * rng.normal())} for _ in range(n)]


@pytest.mark.usefixtures("task_identity")
def test_central_mode_releases_the_mean_of_clipped_updates_ignoring_weights() -> None:
    n, clip = 5, 0.8
    dp = ClientLevelDP(FedAvg(min_available_nodes=n, min_train_nodes=n), mode="central", noise_multiplier=1.0,
                       clip_norm=clip, num_clients=n, expected_clients=n, noise_source=ZeroNoise())
    msgs = _configure(dp, n)
    updates = _updates(n, scale=1.0)  # norms well above 0.8: every update is clipped, 0-d entry included
    replies = [_reply(m, u, weight=10.0 * (i + 1)) for i, (m, u) in enumerate(zip(msgs, updates))]
    before = [{k: bytes(a.data) for k, a in r.content[P.ARRAYS].items()} for r in replies]
    arrays, metrics = dp.aggregate_train(1, replies)
    clipped = [clip_update({k: np.asarray(u[k], dtype=np.float64) for k in ("w", "s")}, clip_norm=clip)[0] for u in updates]
    for key in ("w", "s"):
        want = GLOBAL[key] + np.mean([c[key] for c in clipped], axis=0)
        np.testing.assert_allclose(arrays[key].numpy(), want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(arrays["count"].numpy(), GLOBAL["count"])  # integers: no update, no noise
    assert metrics["train-loss"] == pytest.approx(0.5)
    assert dp.last_event == ReleaseEvent(1, 1.0, 1.0, 5.0, 5.0, clipped=5)
    assert [{k: bytes(a.data) for k, a in r.content[P.ARRAYS].items()} for r in replies] == before


@pytest.mark.usefixtures("task_identity")
def test_central_noise_on_the_sum_has_std_z_c() -> None:
    n, z, clip = 4, 1.5, 0.5
    big = {"w": np.zeros(100_000, dtype=np.float64), "s": np.asarray(0.0)}
    dp = ClientLevelDP(FedAvg(min_available_nodes=n, min_train_nodes=n), mode="central", noise_multiplier=z,
                       clip_norm=clip, num_clients=n, expected_clients=n)
    arrays = ArrayRecord({k: Array(v) for k, v in big.items()})
    msgs = list(dp.configure_train(1, arrays, ConfigRecord({}), FakeGrid(n)))
    for m in msgs:
        m.metadata.__dict__["_message_id"] = uuid.uuid4().hex
    replies = [Message(RecordDict({P.ARRAYS: arrays, P.METRICS: MetricRecord({P.NUM_EXAMPLES: 1.0})}), reply_to=m)
               for m in msgs]  # zero updates: the release is pure noise / n
    out, _ = dp.aggregate_train(1, replies)
    noise_on_sum = out["w"].numpy() * n
    assert abs(noise_on_sum.var() / (z * clip) ** 2 - 1) < 5 * math.sqrt(2 / 100_000)


@pytest.mark.usefixtures("task_identity")
def test_distributed_mode_accounts_dropouts_at_the_effective_noise() -> None:
    """Under SecAgg+ one reply carries the mean of m clients with weight m; 3 of 4 replied: z' = z sqrt(3/4)."""
    dp = ClientLevelDP(FedAvg(min_available_nodes=4, min_train_nodes=4), mode="distributed", noise_multiplier=2.0,
                       clip_norm=1.0, num_clients=4, expected_clients=4, aggregated_replies=True)
    msgs = _configure(dp, 4)
    mean_update = {"w": np.full((3, 4), 0.1), "s": np.asarray(-0.2)}
    arrays, _ = dp.aggregate_train(1, [_reply(msgs[0], mean_update, weight=3.0)])
    np.testing.assert_allclose(arrays["w"].numpy(), GLOBAL["w"] + 0.1, rtol=1e-6, atol=1e-7)
    assert float(arrays["s"].numpy()) == pytest.approx(0.05)
    assert dp.last_event is not None and dp.last_event.noise_multiplier == pytest.approx(2.0 * math.sqrt(3 / 4))
    dp.configure_train(2, ArrayRecord({k: Array(v) for k, v in GLOBAL.items()}), ConfigRecord({}), FakeGrid(4))
    assert dp.aggregate_train(2, []) == (None, None) and dp.last_event is None  # nothing released, nothing spent


@pytest.mark.usefixtures("task_identity")
def test_server_optimiser_runs_on_the_private_release() -> None:
    n = 3
    inner = FedAdam(min_available_nodes=n, min_train_nodes=n, eta=0.1, beta_1=0.0, beta_2=0.0, tau=1e-3)
    dp = ClientLevelDP(inner, mode="central", noise_multiplier=1.0, clip_norm=100.0, num_clients=n,
                       expected_clients=n, noise_source=ZeroNoise())
    msgs = _configure(dp, n)
    updates = _updates(n, scale=0.1)
    arrays, _ = dp.aggregate_train(1, [_reply(m, u) for m, u in zip(msgs, updates)])
    delta = np.mean([u["w"] for u in updates], axis=0)
    want = GLOBAL["w"] + 0.1 * delta / (np.abs(delta) + 1e-3)  # Adam with beta = 0 on the (noise-free) mean
    np.testing.assert_allclose(arrays["w"].numpy(), want, rtol=1e-5)


@pytest.mark.usefixtures("task_identity")
def test_poisson_sampling_keeps_each_node_with_probability_q_and_uses_the_fixed_denominator() -> None:
    n, q = 200, 0.25
    dp = ClientLevelDP(FedAvg(min_available_nodes=n, min_train_nodes=n), mode="central", noise_multiplier=1.0,
                       clip_norm=100.0, num_clients=n, expected_clients=n, sampling="poisson", fraction=q,
                       noise_source=ZeroNoise(), sampler=random.Random(1))
    kept = [len(_configure(dp, n)) for _ in range(20)]
    assert abs(np.mean(kept) - q * n) < 5 * math.sqrt(n * q * (1 - q) / 20)
    assert dp.sample_rate == q and dp.expected_clients == q * n
    msgs = _configure(dp, n)
    arrays, _ = dp.aggregate_train(1, [_reply(m, {"w": np.ones((3, 4))}) for m in msgs])
    np.testing.assert_allclose(arrays["w"].numpy(), GLOBAL["w"] + len(msgs) / (q * n), rtol=1e-6, atol=1e-7)


# --- the client's share, and FedProx -------------------------------------------------------------------------


def _site(tmp_path: Path, n: int = 60) -> Site:
    task = get_task("breast-cancer")
    data = task.load_bundled()
    subset = Dataset(data.x[:n], data.y[:n])
    return Site("client-0", task, subset, subset, tmp_path, None, 0)


def _settings(**kw: Any) -> RoundSettings:
    base = dict(run_id="r", server_round=1, num_rounds=1, task="breast-cancer", partition="iid", seed=0,
                local_epochs=1, lr=0.5, sample_rate=0.25, dp=False, noise_multiplier=0.0, max_grad_norm=1.0,
                target_epsilon=0.0, delta=DELTA, accountant="prv", grad_sample_mode="hooks")
    return RoundSettings(**{**base, **kw})


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))


def test_distributed_client_clips_its_update_and_weighs_one(tmp_path: Path) -> None:
    site = _site(tmp_path)
    glob = {k: v.detach().clone() for k, v in site.task.new_model(0).state_dict().items()}
    plain = train_round(site, _settings(), glob)
    assert _distance(plain.state_dict, glob) > 0.05
    clipped = train_round(site, _settings(client_dp="distributed", client_clip_norm=0.05), glob)
    assert _distance(clipped.state_dict, glob) == pytest.approx(0.05, rel=1e-5)
    assert clipped.metrics[P.NUM_EXAMPLES] == 1.0  # every client counts once in the private mean
    noisy = train_round(site, _settings(client_dp="distributed", client_clip_norm=0.05, client_noise_std_share=1.0), glob)
    n_params = sum(v.numel() for v in glob.values())
    assert _distance(noisy.state_dict, glob) == pytest.approx(math.sqrt(n_params), rel=0.1)  # ~ std * sqrt(d)


def test_proximal_term_is_applied_in_plain_training_exactly() -> None:
    """Full-batch steps: fedshield's plain trainer with mu equals autograd on loss + mu/2 ||w - w0||^2."""
    task = get_task("breast-cancer")
    data = task.load_bundled()
    data = Dataset(data.x[:64], data.y[:64])
    mu, lr, epochs = 0.7, 0.3, 4
    ours = task.new_model(0)
    anchor = [p.detach().clone() for p in ours.parameters()]
    train_plain(ours, data, sample_rate=1.0, epochs=epochs, lr=lr, loss_fn=task.loss_fn(),
                generator=make_generator(0), proximal_mu=mu)
    ref = task.new_model(0)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    for _ in range(epochs):
        opt.zero_grad()
        prox = sum(((p - a) ** 2).sum() for p, a in zip(ref.parameters(), anchor))
        (task.loss_fn()(ref(x), y) + mu / 2 * prox).backward()
        opt.step()
    for p, r in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_proximal_term_pulls_dp_training_towards_the_global_model(tmp_path: Path) -> None:
    site = _site(tmp_path)
    glob = {k: v.detach().clone() for k, v in site.task.new_model(0).state_dict().items()}
    common = dict(dp=True, noise_multiplier=0.5, local_epochs=3, lr=1.0)
    free = train_round(site, _settings(**common), glob)
    (tmp_path / "privacy-ledger.json").unlink()
    pulled = train_round(site, _settings(**common, proximal_mu=0.5), glob)
    assert _distance(pulled.state_dict, glob) < 0.8 * _distance(free.state_dict, glob)


def test_fedprox_mu_reaches_the_clients_round_settings() -> None:
    from fedshield.strategies.stack import build_strategy

    cfg = RunConfig(strategy="fedprox", strategy_params={"proximal_mu": 0.25}, secagg=False, num_clients=2)
    strategy = build_strategy(cfg).top
    config = ConfigRecord(_settings().to_record_dict())
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = 1, 0, 1  # type: ignore[attr-defined]
    try:
        msgs = list(strategy.configure_train(1, ArrayRecord({"a": Array(np.zeros(1))}), config, FakeGrid(2)))
    finally:
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None  # type: ignore[attr-defined]
    sent = RoundSettings.from_record_dict(dict(msgs[0].content[P.CONFIG]))
    assert sent.proximal_mu == 0.25


# --- the report ------------------------------------------------------------------------------------------------


def test_report_client_level_section_recomputes_and_survives_a_resume(tmp_path: Path) -> None:
    cfg = RunConfig(client_dp="distributed", client_clip_norm=1.0, client_noise_multiplier=1.5, num_rounds=3,
                    out=tmp_path)
    report = PrivacyReport(cfg, 0.9, client_noise_multiplier=1.5)
    report.record_client_level(1, ReleaseEvent(1, 1.5, 1.0, 5, 5))
    report.record_client_level(2, None)  # aborted round: nothing released
    report.record_client_level(3, ReleaseEvent(3, 1.5 * math.sqrt(4 / 5), 1.0, 4, 5))
    section = report.to_json()["client_level"]
    assert section["rounds_released"] == 2 and section["sample_rate"] == 1.0 and section["mode"] == "distributed"
    assert section["epsilon"] == pytest.approx(recompute_client_epsilon(section), rel=1e-9)
    mu = math.sqrt(1 / 1.5**2 + 1 / (1.5**2 * 4 / 5))
    assert section["epsilon"] == pytest.approx(_gaussian_epsilon(mu, DELTA), abs=0.02)
    resumed = PrivacyReport(cfg, 0.9, client_noise_multiplier=1.5)
    resumed.load_client_level(json.loads(json.dumps(report.client_level_state())))
    assert resumed.to_json()["client_level"] == section
    off = PrivacyReport(RunConfig(), 0.9).to_json()["client_level"]
    assert off["enabled"] is False and "NO client-level DP" in off["statement"]


# --- end to end: both modes, both guarantees in privacy.json --------------------------------------------------


@pytest.mark.usefixtures("no_leftover_processes")
def test_client_level_dp_end_to_end_reports_both_guarantees(tmp_path: Path) -> None:
    from _multirun import run_many

    common = dict(task="digits", num_clients=4, num_rounds=2, local_epochs=1, epsilon=8.0, client_clip_norm=1.0)
    configs = [
        RunConfig(**common, client_dp="central", client_noise_multiplier=0.8, secagg=False, out=tmp_path / "central"),
        RunConfig(**common, client_dp="distributed", client_epsilon=6.0, secagg=True, out=tmp_path / "distributed"),
        RunConfig(**common, client_dp="central", client_noise_multiplier=0.8, secagg=False, fraction_train=0.5,
                  client_sampling="poisson", out=tmp_path / "poisson"),
    ]
    run_many(configs)
    for cfg in configs:
        privacy = json.loads((cfg.out / "privacy.json").read_text())
        rows = [json.loads(line) for line in (cfg.out / "metrics.jsonl").read_text().splitlines()]
        assert privacy["guarantee"]["level"] == "record" and 0 < privacy["guarantee"]["epsilon"] <= 8.0
        section = privacy["client_level"]
        assert section["enabled"] and section["mode"] == cfg.client_dp and section["clip_norm"] == 1.0
        assert section["epsilon"] == pytest.approx(recompute_client_epsilon(section), rel=1e-9)
        if cfg.client_sampling == "fixed":
            assert section["rounds_released"] == 2 and all(r["clients_trained"] == 4 for r in rows), rows
            mu = math.sqrt(sum(n / z**2 for z, _, n in section["history"]))
            assert section["epsilon"] == pytest.approx(_gaussian_epsilon(mu, cfg.delta), abs=0.02)
        else:
            assert section["sample_rate"] == 0.5 and section["expected_clients"] == 2.0
            # Every round is a release, also one whose Poisson draw took nobody (noise alone, 1/16 per round here):
            # skipping it would reveal the empty draw.
            assert section["rounds_released"] == len(rows) == 2, rows
    distributed = json.loads((tmp_path / "distributed" / "privacy.json").read_text())["client_level"]
    assert 5.9 <= distributed["epsilon"] <= 6.0  # calibrated for the 2 planned rounds, all 4 clients replied
    assert distributed["noise_multiplier"] == pytest.approx(distributed["history"][0][0])
