"""Client-level DP around the strategy and on the site: the server wrapper's arithmetic (central and distributed
modes, dropouts, the server optimiser, Poisson sampling), the client's clipped share, FedProx's proximal term, and
the privacy report's client-level section."""

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
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords  # the reference our average must equal
from flwr.supercore.task_identity import TaskIdentity

from fedshield import protocol as P
from fedshield.client.site import Site
from fedshield.client.trainer import train_round
from fedshield.config import RoundSettings, RunConfig
from fedshield.dataspec import Dataset
from fedshield.privacy.client_level_mechanism import clip_update
from fedshield.training import make_generator, train_plain
from fedshield.server.report import PrivacyReport, recompute_client_epsilon
from fedshield.errors import ProtocolError
from fedshield.strategies.client_level_dp import ClientLevelDP, ReleaseEvent, _average_metrics
from fedshield.tasks import get_task

from _grid import FakeGrid

from _client_dp_rounds import DELTA, GLOBAL, ZeroNoise, configure_round, gaussian_epsilon, random_updates, reply_with


@pytest.mark.usefixtures("task_identity")
def test_central_mode_releases_the_mean_of_clipped_updates_ignoring_weights() -> None:
    n, clip = 5, 0.8
    dp = ClientLevelDP(FedAvg(min_available_nodes=n, min_train_nodes=n), mode="central", noise_multiplier=1.0,
                       clip_norm=clip, num_clients=n, expected_clients=n, noise_source=ZeroNoise())
    msgs = configure_round(dp, n)
    updates = random_updates(n, scale=1.0)  # norms well above 0.8: every update is clipped, 0-d entry included
    replies = [reply_with(m, u, weight=10.0 * (i + 1)) for i, (m, u) in enumerate(zip(msgs, updates))]
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


def test_the_released_metrics_are_flowers_weighted_average() -> None:
    """The wrapper averages the replies' metrics itself (Flower's function is slow on the release's critical path):
    the same numbers as Flower's ``aggregate_metricrecords``, lists included; nothing when a weight is not > 0."""
    rng = random.Random(0)
    for _ in range(200):
        records = [MetricRecord({P.NUM_EXAMPLES: rng.choice([1.0, 3, 7.5]), "loss": rng.random(),
                                 "steps": rng.randint(0, 10), "per-class": [rng.random() for _ in range(3)]})
                   for _ in range(rng.randint(1, 6))]
        want = aggregate_metricrecords([RecordDict({"m": r}) for r in records], P.NUM_EXAMPLES)
        assert dict(_average_metrics(records, P.NUM_EXAMPLES)) == dict(want)
    assert dict(_average_metrics([MetricRecord({P.NUM_EXAMPLES: 0.0, "loss": 1.0})], P.NUM_EXAMPLES)) == {}
    mismatched = [MetricRecord({P.NUM_EXAMPLES: 1.0, "h": [1.0, 2.0]}), MetricRecord({P.NUM_EXAMPLES: 1.0, "h": [1.0]})]
    assert dict(_average_metrics(mismatched, P.NUM_EXAMPLES)) == {}


@pytest.mark.usefixtures("task_identity")
def test_a_reply_shaped_unlike_the_global_model_is_refused_not_reshaped() -> None:
    """The fold flattens every reply: a tensor with the global model's size but another shape must not slip in."""
    dp = ClientLevelDP(FedAvg(min_available_nodes=2, min_train_nodes=2), mode="central", noise_multiplier=1.0,
                       clip_norm=1.0, num_clients=2, expected_clients=2, noise_source=ZeroNoise())
    msgs = configure_round(dp, 2)
    bad = reply_with(msgs[0], {})
    bad.content[P.ARRAYS]["w"] = Array(GLOBAL["w"].reshape(4, 3))
    with pytest.raises(ProtocolError, match="has shape"):
        dp.aggregate_train(1, [reply_with(msgs[1], {}), bad])


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
    msgs = configure_round(dp, 4)
    mean_update = {"w": np.full((3, 4), 0.1), "s": np.asarray(-0.2)}
    arrays, _ = dp.aggregate_train(1, [reply_with(msgs[0], mean_update, weight=3.0)])
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
    msgs = configure_round(dp, n)
    updates = random_updates(n, scale=0.1)
    arrays, _ = dp.aggregate_train(1, [reply_with(m, u) for m, u in zip(msgs, updates)])
    delta = np.mean([u["w"] for u in updates], axis=0)
    want = GLOBAL["w"] + 0.1 * delta / (np.abs(delta) + 1e-3)  # Adam with beta = 0 on the (noise-free) mean
    np.testing.assert_allclose(arrays["w"].numpy(), want, rtol=1e-5)


@pytest.mark.usefixtures("task_identity")
def test_poisson_sampling_keeps_each_node_with_probability_q_and_uses_the_fixed_denominator() -> None:
    n, q = 200, 0.25
    dp = ClientLevelDP(FedAvg(min_available_nodes=n, min_train_nodes=n), mode="central", noise_multiplier=1.0,
                       clip_norm=100.0, num_clients=n, expected_clients=n, sampling="poisson", fraction=q,
                       noise_source=ZeroNoise(), sampler=random.Random(1))
    kept = [len(configure_round(dp, n)) for _ in range(20)]
    assert abs(np.mean(kept) - q * n) < 5 * math.sqrt(n * q * (1 - q) / 20)
    assert dp.sample_rate == q and dp.expected_clients == q * n
    msgs = configure_round(dp, n)
    arrays, _ = dp.aggregate_train(1, [reply_with(m, {"w": np.ones((3, 4))}) for m in msgs])
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
    assert section["epsilon"] == pytest.approx(gaussian_epsilon(mu, DELTA), abs=0.02)
    resumed = PrivacyReport(cfg, 0.9, client_noise_multiplier=1.5)
    resumed.load_client_level(json.loads(json.dumps(report.client_level_state())))
    assert resumed.to_json()["client_level"] == section
    off = PrivacyReport(RunConfig(), 0.9).to_json()["client_level"]
    assert off["enabled"] is False and "NO client-level DP" in off["statement"]


