"""--dp-mode distributed: the real simulation engine end to end, the trust assumption enforced at the site and at
the server, and the settings it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common.secure_aggregation.secaggplus_constants import Key
from flwr.serverapp.strategy import FedAvg
from safetensors.torch import load_file

from fedshield.client.policy import PolicyRefused, SitePolicy, check_request
from fedshield.client.secaggplus import _Refused, _State, _unmask
from fedshield.config import RoundSettings, RunConfig
from fedshield.errors import ConfigError
from fedshield.privacy.skellam_ledger import SKELLAM_LEDGER_FILE, load_history
from fedshield.privacy.skellam_accountant import epsilon as skellam_epsilon
from fedshield.server.report import recompute_epsilon
from fedshield.strategies._secagg_fold import FieldSum
from fedshield.strategies.distributed_dp import DistributedSecAggPlus
from fedshield.tasks import get_task

import _sim_batch as sim_batch

DDP = dict(dp_mode="distributed", local_epochs=1, sample_rate=0.1)
# Real engine, real SecAgg+: 3 sites, 2 rounds, in the shared simulation of the other 3-client tests.
sim_batch.register("distributed_dp", lambda root: RunConfig(num_clients=3, num_rounds=2, epsilon=8.0, lr=2.0,
                                                            out=root / "ddp", **DDP), clients=3)  # fmt: skip


def test_distributed_mode_refuses_settings_it_cannot_guarantee() -> None:
    with pytest.raises(ConfigError, match="SecAgg"):
        RunConfig(num_clients=3, secagg=False, **DDP)
    with pytest.raises(ConfigError, match="local-epochs 1"):
        RunConfig(num_clients=3, **{**DDP, "local_epochs": 2})
    with pytest.raises(ConfigError, match="min-honest 6"):
        RunConfig(num_clients=5, min_honest=6, **DDP)
    assert RunConfig(num_clients=5, min_honest=0.5, **DDP).min_honest_count == 3
    assert RunConfig(num_clients=5, min_honest=2, **DDP).min_honest_count == 2
    assert RunConfig(num_clients=5, min_honest=1.0, **DDP).min_honest_count == 5


def test_site_refuses_a_weaker_trust_assumption_than_its_policy() -> None:
    """A round assuming more honest sites than the site relies on gives each site a smaller noise share: refused.
    Fewer (a larger share each) protects the site more and is accepted."""
    policy = SitePolicy(task="digits", min_honest=3)
    config = {"task": "digits", "dp": True, "noise-multiplier": 1.0, "accountant": "prv", "delta": 1e-5,
              "dp-mode": "distributed", "min-honest": 4}
    with pytest.raises(PolicyRefused, match="fedshield:policy-refused: min-honest: .*--min-honest 3 or less"):
        check_request(policy, config, train=True)
    check_request(policy, {**config, "min-honest": 3}, train=True)
    check_request(policy, {**config, "min-honest": 1}, train=True)
    check_request(policy, {**config, "dp-mode": "local"}, train=True)


def test_site_refuses_to_unmask_below_min_honest() -> None:
    state = _State(nid=1, threshold=2, min_honest=3, rd_seed_share_dict={1: b"a", 2: b"b", 3: b"c"},
                   sk1_share_dict={1: b"a", 2: b"b", 3: b"c"})
    with pytest.raises(_Refused, match="fewer than the 3 \\(min-honest\\)"):
        _unmask(state, {Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]})
    assert _unmask(state, {Key.ACTIVE_NODE_ID_LIST: [1, 2, 3], Key.DEAD_NODE_ID_LIST: []})[Key.SHARE_LIST] == [b"a", b"b", b"c"]


def test_server_releases_nothing_below_min_honest() -> None:
    settings = RoundSettings(run_id="r", server_round=1, num_rounds=1, task="digits", partition="iid", seed=0,
                             local_epochs=1, lr=1.0, sample_rate=0.1, dp=True, noise_multiplier=1.0, max_grad_norm=1.0,
                             target_epsilon=0.0, delta=1e-5, accountant="prv", grad_sample_mode="hooks",
                             dp_mode="distributed", min_honest=3, ddp_sites=4, ddp_batch_bound=100)
    strategy = DistributedSecAggPlus(FedAvg(), settings_for=lambda r: settings, param_keys=[], expected_batch=10.0)
    strategy._settings = settings
    assert strategy._secure_average(None, {1: None, 2: None}, FieldSum(2**32)) is None  # type: ignore[arg-type]
    assert "fewer than min-honest 3" in (strategy._aborted or "")


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> sim_batch.Batch:
    return sim_batch.results(tmp_path_factory, clients=3)


@pytest.mark.usefixtures("no_leftover_processes")
@sim_batch.TIMEOUT
def test_distributed_simulation_learns_and_epsilon_recomputes(batch: sim_batch.Batch) -> None:
    """Real engine, real SecAgg+: 3 sites, 2 rounds; privacy.json and the sites' ledgers agree and recompute."""
    config = batch.config("distributed_dp")
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_trained"] for r in rows] == [3, 3]
    privacy = json.loads((config.out / "privacy.json").read_text())
    dist = privacy["distributed"]
    assert dist["accountant"] == "skellam-rdp" and dist["min_honest"] == 2 and "min_honest" in dist["trust"]
    assert dist["plan"]["total_mu"] > 0 and dist["share_mu"] == pytest.approx(dist["plan"]["total_mu"] / 2)
    for c in privacy["clients"].values():
        assert c["epsilon"] == pytest.approx(recompute_epsilon(c), rel=1e-9)
        assert 7.5 <= c["epsilon"] <= 8.0  # calibrated for 2 one-step rounds; privacy is on
        delta, history, _ = load_history(config.out / "clients" / f"client-{c['partition_id']:04d}"
                                         / SKELLAM_LEDGER_FILE)
        assert skellam_epsilon(history, delta=delta) == pytest.approx(c["epsilon"], rel=1e-9)
    model = load_file(config.out / "model.safetensors")
    initial = get_task("digits").new_model(config.seed).state_dict()
    assert max(float(np.abs(model[k].numpy() - initial[k].numpy()).max()) for k in initial) > 1e-3
