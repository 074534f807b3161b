"""A site's own policy, split, code check and worker robustness, on real parts (real worker socket, real ledger,
real Flower app bundles built by Flower's own builder). The same attacks against real processes are in
``tests/test_hostile_server.py``."""

from __future__ import annotations

import io
import json
import socket
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.cli.build import build_fab_from_disk

from fedshield import protocol as P
from fedshield.client.node_config import BUDGET, DATA_PATH, DELTA, LABEL_COLUMN, STATE_DIR, TASK
from fedshield.client.policy import (
    POLICY_REFUSAL,
    POLICY_REFUSED_CODE,
    SitePolicy,
    check_request,
    default_delta,
    load_policy_file,
    policy_from_node_config,
)
from fedshield.client.split import SPLIT_FILE
from fedshield.client.round_work import REFUSAL_CODE, WORKER_ERROR_CODE, Refusal, run_train
from fedshield.client.warm_worker import ClientWorker
from fedshield.client.warm_worker_wire import request_evaluate, request_train
from fedshield.config import RoundSettings
from fedshield.deploy.site_clientapp import CLIENTAPP_REF, FabRefused, verify_fab
from fedshield.errors import ConfigError
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedshield.deploy.coordinator import app_dir
from fedshield.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """A deployed site: 120 breast-cancer records, its own task, budget 5 at delta 1e-5, DP required."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()  # raw measurements, as a site exports them (the task preprocesses on load)
    path = tmp_path / "site.npz"
    np.savez(path, x=data.data[:120], y=data.target[:120])
    return {DATA_PATH: str(path), STATE_DIR: str(tmp_path / "state"), LABEL_COLUMN: "", BUDGET: 5.0,
            TASK: "breast-cancer", DELTA: 1e-5}


def _config(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        run_id="run", server_round=1, num_rounds=3, task="breast-cancer", partition="iid", seed=3, local_epochs=1,
        lr=0.5, sample_rate=0.5, dp=True, noise_multiplier=1.0, max_grad_norm=1.0, target_epsilon=0.0, delta=1e-5,
        accountant="prv", grad_sample_mode="hooks",
    )
    base.update(changes)
    return base


def _record(**changes: Any) -> dict[str, Any]:
    return RoundSettings(**_config(**changes)).to_record_dict()


def _global() -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in get_task("breast-cancer").new_model(3).state_dict().items()}


# ------------------------------------------------------------------------------------------------ the policy


@pytest.mark.parametrize(
    ("changes", "rule"),
    [
        ({"task": "os:getpid"}, "task"),
        ({"task": "sys:exit"}, "task"),
        ({"dp": False}, "dp"),
        ({"noise-multiplier": 0.0}, "noise-multiplier"),
        ({"noise-multiplier": 0.01, "target-epsilon": 0.0}, "noise-multiplier"),
        ({"noise-multiplier": float("nan")}, "noise-multiplier"),
        ({"delta": 0.5}, "delta"),
        ({"delta": 0.0}, "delta"),
        ({"accountant": "gdp"}, "accountant"),
        ({"accountant": "rdp"}, "accountant"),
    ],
)
def test_every_hostile_round_setting_is_refused_naming_its_rule(changes: dict[str, Any], rule: str) -> None:
    policy = SitePolicy(task="breast-cancer", max_epsilon=5.0)
    with pytest.raises(Exception) as refused:
        check_request(policy, {**{k.replace("_", "-"): v for k, v in _config().items()}, **changes}, train=True)
    assert getattr(refused.value, "reason", "").startswith(f"{POLICY_REFUSAL}: {rule}: "), refused.value


def test_an_honest_round_passes_and_simulation_has_no_site_policy() -> None:
    honest = {k.replace("_", "-"): v for k, v in _config().items()}
    check_request(SitePolicy(task="breast-cancer"), honest, train=True)
    check_request(SitePolicy(task="breast-cancer", allow_no_dp=True), {**honest, "dp": False}, train=True)
    assert policy_from_node_config({"partition-id": 0, "num-partitions": 2}) is None
    with pytest.raises(ConfigError, match="--task"):
        policy_from_node_config({DATA_PATH: "/d.csv"})


def test_policy_defaults_and_file(tmp_path: Path) -> None:
    assert default_delta(100) == 1e-5 and default_delta(150_000) == 1e-6 and default_delta(1_000_000) == 1e-7
    policy = policy_from_node_config({DATA_PATH: "/d.csv", TASK: "digits", BUDGET: 0.0})
    assert policy == SitePolicy(task="digits", max_epsilon=10.0, delta=1e-5, accountant="prv", allow_no_dp=False)
    path = tmp_path / "policy.toml"
    path.write_text('max-epsilon = 4.0\ndelta = 1e-6\nallow-no-dp = true\n')
    assert load_policy_file(path) == {"max_epsilon": 4.0, "delta": 1e-6, "allow_no_dp": True}
    path.write_text('max-epsilonn = 4.0\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load_policy_file(path)
    for bad in (dict(max_epsilon=0.0), dict(delta=0.5 * 4), dict(accountant="gdp")):
        with pytest.raises(ConfigError):
            SitePolicy(task="digits", **bad)  # type: ignore[arg-type]


def test_policy_refusals_leave_the_ledger_untouched_and_the_site_accounts_at_its_own_terms(
    site: dict[str, Any]
) -> None:
    ledger_path = Path(site[STATE_DIR]) / LEDGER_FILE
    for hostile in (_record(dp=False), _record(delta=0.5), _record(noise_multiplier=0.01), _record(task="os:getpid")):
        with pytest.raises(Refusal) as refused:
            run_train(site, hostile, _global())
        assert refused.value.code == POLICY_REFUSED_CODE, refused.value.reason
    assert not ledger_path.exists(), "a policy refusal never opens the ledger"
    # A server asking for a smaller delta: the site still accounts at its own 1e-5, and says so.
    result = run_train(site, _record(delta=1e-7), _global())
    ledger = PrivacyLedger.load(ledger_path)
    assert ledger.delta == 1e-5 and result.metrics[P.DELTA] == 1e-5 and ledger.budget == 5.0
    assert result.metrics[P.EPSILON] == pytest.approx(ledger.epsilon)
    # The server's target epsilon may tighten the budget, never loosen it.
    with pytest.raises(Refusal) as refused:
        for server_round in range(2, 30):
            run_train(site, _record(server_round=server_round, target_epsilon=1000.0), _global())
    assert refused.value.code == REFUSAL_CODE and refused.value.reason.startswith(P.BUDGET_REFUSAL)
    assert PrivacyLedger.load(ledger_path).epsilon <= 5.0


# ------------------------------------------------------------------------------------------------ the split


def test_the_site_keeps_its_own_split_whatever_the_server_seed(site: dict[str, Any]) -> None:
    from fedshield.client import site as site_module

    settings = RoundSettings(**_config(seed=1))
    first = site_module.resolve_site(site, settings)
    site_module.load_site_files.cache_clear()
    other = site_module.resolve_site(site, RoundSettings(**_config(seed=999)))
    np.testing.assert_array_equal(first.test.y, other.test.y)
    np.testing.assert_array_equal(first.test.x, other.test.x)
    saved = json.loads((Path(site[STATE_DIR]) / SPLIT_FILE).read_text())
    assert len(saved["seed"]) > 20, "a 128-bit seed from the OS, not the server's"
    # A changed data file is noticed, not silently re-split.
    site_module.load_site_files.cache_clear()
    with np.load(site[DATA_PATH]) as data:
        x, y = data["x"].copy(), data["y"]
    x[0, 0] += 1.0
    np.savez(site[DATA_PATH], x=x, y=y)
    with pytest.raises(ConfigError, match="data file changed"):
        site_module.resolve_site(site, settings)
    site_module.load_site_files.cache_clear()


def test_a_deployed_site_reads_only_its_own_file_whatever_the_round_names(site: dict[str, Any], tmp_path: Path) -> None:
    """``sim-data`` / ``text-column`` / ``label-column`` are simulation settings: a hostile server naming another
    file (or columns) for a deployed site changes nothing it reads."""
    from fedshield.client import site as site_module

    site_module.load_site_files.cache_clear()
    own = site_module.resolve_site(site, RoundSettings(**_config()))
    bait = tmp_path / "bait.npz"
    np.savez(bait, x=np.zeros((50, 1, 8, 8), dtype=np.float32), y=np.zeros(50, dtype=np.int64))
    site_module.load_site_files.cache_clear()
    hostile = site_module.resolve_site(site, RoundSettings(**_config(sim_data=str(bait), text_column="x",
                                                                          label_column="y")))
    assert len(hostile.train) + len(hostile.test) == len(own.train) + len(own.test) != 50
    np.testing.assert_array_equal(hostile.test.x, own.test.x)
    site_module.load_site_files.cache_clear()


def test_breast_cancer_preprocessing_uses_fixed_constants_not_the_partys_statistics() -> None:
    task = get_task("breast-cancer")
    raw = np.random.default_rng(1).uniform(0.5, 30.0, size=(50, 30))
    alone = task.preprocess(raw[:1])  # type: ignore[misc]
    together = task.preprocess(raw)  # type: ignore[misc]
    np.testing.assert_array_equal(alone[0], together[0])  # one record's input depends on that record only
    from fedshield.tasks import builtin

    assert isinstance(builtin._BC_LOG_MEAN, tuple) and isinstance(builtin._BC_LOG_STD, tuple)
    assert len(builtin._BC_LOG_MEAN) == len(builtin._BC_LOG_STD) == 30


# ------------------------------------------------------------------------------------------------ the worker


def test_the_worker_survives_system_exit_and_an_idle_connection_does_not_block_it(tmp_path: Path) -> None:
    """A simulated node config (no site policy) lets the server's task name reach the importer: the worker must
    survive what it raises (``sys:exit`` raises SystemExit), and an idle peer must not hold the worker."""
    simulated = {"partition-id": 0, "num-partitions": 2, STATE_DIR: str(tmp_path / "s")}
    with ClientWorker(simulated) as worker:
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        idle.connect(worker.socket_path)  # connects and never sends: must not block the next request
        try:
            started = time.monotonic()
            with pytest.raises(Refusal) as refused:
                request_train(worker.socket_path, _record(task="sys:exit", dp=False), _global())
            assert refused.value.code == WORKER_ERROR_CODE and "SystemExit" in refused.value.reason
            honest = request_evaluate(worker.socket_path, _record(sim_state_root=str(tmp_path)), _global())
            assert honest[P.NUM_EXAMPLES] > 0, "served again after SystemExit"
            assert time.monotonic() - started < 50, "an idle connection held the worker"
        finally:
            idle.close()
        assert worker._thread is not None and worker._thread.is_alive()


# ------------------------------------------------------------------------------------------------ the app bundle


def _fab(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as fab:
        for name, text in files.items():
            fab.writestr(name, text)
    return buffer.getvalue()


def test_only_fedshields_code_free_bundle_passes_the_site_check() -> None:
    verify_fab(build_fab_from_disk(app_dir()))  # what `fedshield server` submits
    with pytest.raises(FabRefused, match="carries files besides pyproject.toml"):
        verify_fab(build_fab_from_disk(ROOT / "tests" / "apps" / "echo_app"))
    own = f'[tool.flwr.app.components]\nserverapp = "x:app"\nclientapp = "{CLIENTAPP_REF}"\n'
    verify_fab(_fab({"pyproject.toml": own, ".info/CONTENT": ""}))  # the ServerApp is the coordinator's business
    with pytest.raises(FabRefused, match="names ClientApp 'evil.client:app'"):
        verify_fab(_fab({"pyproject.toml": own.replace(CLIENTAPP_REF, "evil.client:app")}))
    with pytest.raises(FabRefused, match="sitecustomize.pth"):
        verify_fab(_fab({"pyproject.toml": own, "sitecustomize.pth": "import os"}))
    with pytest.raises(FabRefused, match="cannot be read"):
        verify_fab(b"not a zip")


def test_canary_flowers_clientapp_runner_still_has_the_names_the_site_replaces() -> None:
    """fedshield.deploy.site_clientapp swaps these module globals of Flower 1.39's runner; if Flower renames them,
    the swap would silently do nothing and the bundle's code would run again. Fail here first."""
    import importlib
    import inspect

    runner = importlib.import_module("flwr.supernode.runtime.run_clientapp")
    cli = importlib.import_module("flwr.supernode.cli.flwr_clientapp")
    source = inspect.getsource(runner.run_clientapp)
    for name in ("install_from_fab", "get_load_client_app_fn", "install_app_dependencies"):
        assert callable(getattr(runner, name)) and f"{name}(" in source, name
    assert cli.run_clientapp is runner.run_clientapp and "run_clientapp(" in inspect.getsource(cli.flwr_clientapp)
