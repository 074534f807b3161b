"""Strategies by name: the registry and its errors, composition checks, every aggregate against a numpy reference
on hand-made updates (``_strategy_rounds.py``), and all 11 strategies end to end in one simulation. Streaming is in
``test_streaming.py``, update validation in ``test_update_validation.py``."""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord
from safetensors.torch import load_file

import flwr.serverapp.strategy as flwr_strategies
from fedshield import protocol as P
from fedshield.config import ROBUST_STRATEGIES, STRATEGIES, RunConfig, load_config_file
from fedshield.errors import ConfigError
from fedshield.strategies.registry import build, get_entry, strategy_names, validate_params
from fedshield.strategies.stack import build_strategy
from fedshield.strategies.streaming import StreamingFedAvg
from fedshield.tasks import get_task

import _sim_batch as sim_batch
from _grid import FakeGrid
from _strategy_rounds import CASES, N, SHAPES, WEIGHTS, as_numpy, client_models, configure, reference, reply, sampling


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", STRATEGIES)
def test_aggregate_equals_numpy_reference(name: str) -> None:
    params = CASES[name]
    strategy = build(name, params, sampling=sampling(N))
    messages = configure(strategy, N)
    models = client_models(N)
    arrays, metrics = strategy.aggregate_train(1, [reply(m, x, w) for m, x, w in zip(messages, models, WEIGHTS)])
    assert arrays is not None and metrics is not None
    got, want = as_numpy(arrays), reference(name, params, models)
    assert list(got) == list(SHAPES)
    for key, (shape, _) in SHAPES.items():
        assert got[key].shape == shape, key  # 0-d stays 0-d
        np.testing.assert_allclose(got[key], want[key], rtol=2e-6, atol=2e-6, err_msg=f"{name}:{key}")


def test_registry_matches_config_and_flower_signatures() -> None:
    assert strategy_names() == STRATEGIES
    assert set(ROBUST_STRATEGIES) == {n for n in STRATEGIES if get_entry(n).robust}
    for name in STRATEGIES:
        entry = get_entry(name)
        cls = entry.strategy_class()
        assert issubclass(cls, flwr_strategies.FedAvg), name  # Flower's own implementations (FedAvg family)
        signature = inspect.signature(cls.__init__).parameters
        for spec in entry.params:
            assert spec.name in signature, f"{name}: Flower's {cls.__name__} has no argument {spec.name}"
    assert get_entry("fedavg").strategy_class() is StreamingFedAvg


def test_params_reach_flower_strategy() -> None:
    s = build("fedadam", {"eta": 0.3, "beta-1": 0.5, "tau": 1e-2}, sampling=sampling(4))
    assert isinstance(s, flwr_strategies.FedAdam) and (s.eta, s.beta_1, s.tau) == (0.3, 0.5, 0.01)
    s = build("multikrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 2.0}, sampling=sampling(5))
    assert (s.num_malicious_nodes, s.num_nodes_to_select) == (1, 2)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("fedavg", {"beta": 0.1}, "strategy 'fedavg' has no setting 'beta': its settings are none"),
        ("fedadam", {"etaa": 0.1}, "has no setting 'etaa': its settings are eta, eta_l, beta_1, beta_2, tau"),
        ("fedadam", {"beta_1": 1.0}, "beta_1 must be in \\[0, 1\\)"),
        ("fedadam", {"eta": "fast"}, "eta must be a number"),
        ("fedadam", {"eta": True}, "eta must be a number"),
        ("fedtrimmedavg", {"beta": 0.5}, "beta must be in \\[0, 0.5\\)"),
        ("krum", {"num_malicious_nodes": 1.5}, "num_malicious_nodes must be a whole number"),
        ("krum", {"num_malicious_nodes": 2}, "needs at least 2f\\+3 = 7 clients per round, got 5"),
        ("bulyan", {"num_malicious_nodes": 1}, "needs at least 4f\\+3 = 7 clients per round, got 5"),
        ("multikrum", {"num_nodes_to_select": 9}, "num_nodes_to_select=9 is more than the 5 clients"),
        ("fedavgm", {"server_momentum": -0.1}, "server_momentum must be in \\[0, 1\\)"),
    ],
)
def test_bad_params_name_the_key(name: str, params: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        validate_params(name, params, clients_per_round=5)


def test_unknown_strategy_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd': choose one of fedavg, fedavgm, .*fedtrimmedavg"):
        RunConfig(strategy="fedsgd")
    with pytest.raises(ConfigError, match="unknown strategy 'fedsgd'"):
        get_entry("fedsgd")


@pytest.mark.parametrize("name", ROBUST_STRATEGIES)
def test_robust_aggregators_refuse_secagg_and_say_what_to_do(name: str) -> None:
    with pytest.raises(ConfigError, match=f"'{name}' needs every client's individual update.*--no-secagg.*fedavg"):
        RunConfig(strategy=name, secagg=True)
    RunConfig(strategy=name, secagg=False)


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"client_dp": "central", "client_clip_norm": 1.0, "client_epsilon": 3.0}, "server clips every client's update.*distributed.*--no-secagg"),
        ({"client_dp": "central", "client_clip_norm": 1.0, "client_epsilon": 3.0, "secagg": False, "strategy": "krum"}, "'krum' does not average"),
        ({"client_dp": "distributed", "client_epsilon": 3.0}, "needs --client-clip-norm"),
        ({"client_dp": "distributed", "client_clip_norm": 1.0}, "exactly one of --client-noise-multiplier"),
        ({"client_dp": "distributed", "client_clip_norm": 1.0, "client_epsilon": 3.0, "client_noise_multiplier": 1.0}, "both were given"),
        ({"client_dp": "local", "client_clip_norm": 1.0}, "unknown client-dp mode 'local'"),
        ({"client_clip_norm": 1.0}, "client-clip-norm set but client-level DP is off"),
        ({"client_sampling": "poisson"}, "client-sampling set but client-level DP is off"),
        ({"max_update_norm": 5.0}, "max-update-norm checks each client's update.*--no-secagg"),
        ({"max_update_norm": -1.0, "secagg": False}, "max-update-norm must be a finite number > 0"),
    ],
)
def test_composition_is_checked_at_start_up(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig(**settings)


def test_strategy_table_from_config_file_and_flower_run_config(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[fedshield]\nstrategy = "fedtrimmedavg"\nsecagg = false\n\n[strategy]\nbeta = 0.1\n')
    cfg = load_config_file(path)
    assert cfg.strategy == "fedtrimmedavg" and dict(cfg.strategy_params) == {"beta": 0.1}
    path.write_text('secagg = false\n[strategy]\nname = "krum"\nnum-malicious-nodes = 0\n')
    cfg = load_config_file(path)
    assert cfg.strategy == "krum" and dict(cfg.strategy_params) == {"num_malicious_nodes": 0}
    again = RunConfig.from_mapping(json.loads(json.dumps(cfg.to_flat_dict())))
    assert again == cfg and hash(again) == hash(cfg)
    flower = RunConfig.from_mapping({"strategy": "fedprox", "strategy-params.proximal-mu": 0.01, "max-update-norm": 0,
                                     "client-epsilon": 0}, zero_is_unset=True)
    assert dict(flower.strategy_params) == {"proximal_mu": 0.01} and flower.max_update_norm is None
    path.write_text('[fedshield]\nstrategy = "fedavg"\n[strategy]\nmomentum = {a = 1}\n')
    with pytest.raises(ConfigError, match="strategy setting 'momentum' must be a number"):
        load_config_file(path)


def test_build_strategy_checks_params_at_start_up() -> None:
    with pytest.raises(ConfigError, match="strategy 'fedprox' has no setting 'mu'"):
        build_strategy(RunConfig(strategy="fedprox", strategy_params={"mu": 0.1}))


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("strategy", "secagg"), [("fedavg", True), ("fedavg", False), ("krum", False)])
@pytest.mark.parametrize(("fraction", "asked"), [(1.0, 10), (0.3, 3), (0.01, 1), (0.0, 0)])
def test_fraction_evaluate_sets_how_many_clients_evaluate(strategy: str, secagg: bool, fraction: float,
                                                          asked: int) -> None:
    """Through the whole wrapper chain (SecAgg+ included): the rounded share, at least one, none for 0."""
    config = RunConfig(num_clients=10, fraction_evaluate=fraction, strategy=strategy, secagg=secagg)
    assert config.expected_evaluate_clients == asked
    # The last round: earlier rounds fold their evaluation into the next train message (next test).
    messages = list(build_strategy(config).top.configure_evaluate(
        config.num_rounds, ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))}), ConfigRecord({}),
        FakeGrid(10)))  # type: ignore[arg-type]
    assert len(messages) == asked
    assert len({m.metadata.dst_node_id for m in messages}) == asked


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("separate", [False, True])
@pytest.mark.parametrize("secagg", [False, True])
def test_federated_evaluation_rides_in_the_next_train_message_unless_separate(separate: bool, secagg: bool) -> None:
    """Folded (the default): rounds before the last send no evaluate message and ask each trainer to evaluate the
    model it receives; the last round asks no such thing and evaluates its own model. Separate: every round sends
    evaluate messages and no train message asks for an evaluation."""
    config = RunConfig(num_clients=4, num_rounds=3, secagg=secagg, separate_evaluation=separate)
    arrays = ArrayRecord({"w": Array(np.zeros(3, dtype=np.float32))})
    for server_round in (1, 2, 3):
        top = build_strategy(config).top
        folded = not separate and server_round < 3
        # The round's train replies brought figures (what aggregate_train records from them):
        top._received = (None, 4) if folded else None  # type: ignore[attr-defined]
        evaluate = list(top.configure_evaluate(server_round, arrays, ConfigRecord({}), FakeGrid(4)))  # type: ignore[arg-type]
        assert len(evaluate) == (0 if folded else 4)
        if folded:  # ... and had they brought none, the round evaluates with its own messages after all
            top._received = (None, 0)  # type: ignore[attr-defined]
            assert len(list(top.configure_evaluate(server_round, arrays, ConfigRecord({}), FakeGrid(4)))) == 4  # type: ignore[arg-type]
        if not secagg:  # SecAgg+ runs its key stages on a real grid here (tests/test_in_clear.py covers it)
            train = list(top.configure_train(server_round, arrays, ConfigRecord({}), FakeGrid(4)))  # type: ignore[arg-type]
            asks = [m.content["config"].get(P.EVALUATE_RECEIVED, False) for m in train]
            assert asks == [folded] * 4


@pytest.mark.parametrize(("changes", "folds"), [
    ({}, True), ({"fraction_train": 0.5, "fraction_evaluate": 0.5}, True), ({"fraction_train": 0.5}, False),
    ({"fraction_evaluate": 0.5}, False), ({"fraction_evaluate": 0.0}, False), ({"separate_evaluation": True}, False),
    ({"client_dp": "central", "client_noise_multiplier": 1.0, "client_clip_norm": 1.0, "secagg": False,
      "client_sampling": "poisson"}, False)])
def test_evaluation_folds_only_when_the_trainers_are_the_clients_it_asks(changes: dict[str, Any], folds: bool) -> None:
    """Folding must neither evaluate on fewer clients than --fraction-evaluate asks nor make more sites disclose
    their test figures than it chose: it needs a fixed sample of the same share."""
    assert build_strategy(RunConfig(num_clients=10, **changes)).top.fold_evaluation is folds


@pytest.mark.parametrize(("shares", "threshold", "expected"), [
    (1.0, 0.66, (1.0, 0.66)), (5.0, 3.0, (5, 3)), (7, 0.75, (7, 0.75)), (0.5, 2.0, (0.5, 2))])
def test_secagg_shares_and_threshold_reach_secagg_as_counts_or_fractions(
        shares: float, threshold: float, expected: tuple[int | float, int | float]) -> None:
    from fedshield.strategies.secagg import SecAggPlus

    config = RunConfig(num_clients=10, secagg_shares=shares, secagg_threshold=threshold)
    (secagg,) = [layer for layer in build_strategy(config).layers if isinstance(layer, SecAggPlus)]
    assert (secagg.num_shares, secagg.reconstruction_threshold) == expected
    assert [type(v) for v in (secagg.num_shares, secagg.reconstruction_threshold)] == [type(v) for v in expected]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"secagg_shares": 2}, "secagg-shares must be a fraction in \\(0, 1\\] or a whole count >= 3"),
    ({"secagg_shares": 4.5}, "secagg-shares must be"),
    ({"secagg_threshold": 1.5}, "secagg-threshold must be a fraction in \\(0, 1\\] or a whole count >= 2"),
    ({"secagg_shares": 5, "secagg_threshold": 6}, "secagg-threshold 6 is above secagg-shares 5"),
])
def test_bad_secagg_parameters_are_named(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RunConfig(**kwargs)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_bad_fraction_evaluate_is_named(fraction: float) -> None:
    with pytest.raises(ConfigError, match=r"fraction-evaluate must be in \[0, 1\]"):
        RunConfig(fraction_evaluate=fraction)


# --- every strategy end to end, in one simulation -----------------------------------------------------------

E2E_PARAMS: dict[str, dict[str, Any]] = {
    "fedavgm": {"server_momentum": 0.5}, "fedprox": {"proximal_mu": 0.1},
    "multikrum": {"num_nodes_to_select": 2}, "fedtrimmedavg": {"beta": 0.25},
}


for _name in STRATEGIES:  # all 11, 4 clients x 2 rounds each, averaging ones under SecAgg+, robust ones without,
    # in the shared simulation of the other 4-client tests (one Ray start)
    sim_batch.register(f"strategies/{_name}", lambda root, name=_name: RunConfig(
        task="digits", num_clients=4, num_rounds=2, local_epochs=1, dp=False, strategy=name,
        strategy_params=E2E_PARAMS.get(name, {}), secagg=name not in ROBUST_STRATEGIES, out=root / f"strategy-{name}",
    ), clients=4)


@pytest.fixture(scope="module")
def all_strategy_runs(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, RunConfig]:
    return sim_batch.results(tmp_path_factory, clients=4).view("strategies/")


@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.parametrize("name", STRATEGIES)
@sim_batch.TIMEOUT
def test_every_strategy_runs_end_to_end(all_strategy_runs: Mapping[str, RunConfig], name: str) -> None:
    config = all_strategy_runs[name]
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["clients_trained"] == 4 and r["clients_failed"] == 0 for r in rows), rows
    assert all(r["clients_rejected"] == 0 and r["rejected"] == [] for r in rows), rows
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    saved = json.loads((config.out / "config.json").read_text())
    assert saved["strategy"] == name and saved["strategy_params"] == E2E_PARAMS.get(name, {})
    weights = load_file(config.out / "model.safetensors")
    initial = get_task("digits").new_model(config.seed).state_dict()
    assert any(not np.allclose(weights[k].numpy(), initial[k].numpy()) for k in initial), "the model never moved"
    assert all(np.isfinite(w.numpy()).all() for w in weights.values())
    privacy = json.loads((config.out / "privacy.json").read_text())
    assert privacy["client_level"]["enabled"] is False
