"""Client-level DP claims only what it accounts: the adjacency each sampling supports, noise shares SecAgg+ would
clip refused, participation that Poisson accounting hides kept out of privacy.json, and no skipped Poisson round."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from fedshield.config import RunConfig
from fedshield.errors import ConfigError
from fedshield.privacy.client_level_mechanism import SHARE_SIGMAS, check_shares_fit, noise_std_share
from fedshield.privacy.secure_noise import SecureGaussian
from fedshield.server.report import PrivacyReport, recompute_client_epsilon
from fedshield.server.runner import check_noise_shares
from fedshield.strategies.client_level_dp import ClientLevelDP, ReleaseEvent
from _client_dp_rounds import GLOBAL, configure_round


def test_shares_that_secagg_would_clip_are_refused_with_the_fix() -> None:
    # The case: C = 20, z = 1, 5 clients. A share has std 20/sqrt(5) = 8.9, so +-8 clips 37% of them.
    share = noise_std_share(noise_multiplier=1.0, clip_norm=20.0, expected_clients=5)
    shares = share * SecureGaussian().standard_normal((200_000,))
    assert np.mean(np.abs(shares) > 8.0) == pytest.approx(0.37, abs=0.01)
    with pytest.raises(ConfigError, match=r"lower --client-clip-norm to at most ([0-9.]+)") as info:
        check_shares_fit(clipping_range=8.0, clip_norm=20.0, noise_multiplier=1.0, expected_clients=5)
    assert "\n" not in str(info.value)
    fit = float(str(info.value).split("at most ")[1].split(",")[0])
    check_shares_fit(clipping_range=8.0, clip_norm=fit * 0.999, noise_multiplier=1.0, expected_clients=5)
    assert fit * (1 + SHARE_SIGMAS / math.sqrt(5)) == pytest.approx(8.0, rel=1e-3)
    # Wired into the run: the server refuses before any round.
    cfg = RunConfig(client_dp="distributed", client_clip_norm=20.0, client_noise_multiplier=1.0, secagg=True)
    with pytest.raises(ConfigError, match="clipping range"):
        check_noise_shares(cfg, 1.0)
    check_noise_shares(RunConfig(client_dp="distributed", client_clip_norm=1.0, client_noise_multiplier=1.0), 1.0)


def test_distributed_noise_with_poisson_sampling_is_refused() -> None:
    with pytest.raises(ConfigError, match="variance reveals how many clients"):
        RunConfig(client_dp="distributed", client_clip_norm=1.0, client_noise_multiplier=1.0,
                  client_sampling="poisson", fraction_train=0.5)


def test_privacy_json_states_the_adjacency_each_sampling_supports(tmp_path: Path) -> None:
    fixed = RunConfig(client_dp="central", client_clip_norm=1.0, client_noise_multiplier=1.0, secagg=False,
                      fraction_train=0.8, out=tmp_path)
    report = PrivacyReport(fixed, 0.9, client_noise_multiplier=1.0)
    for r in range(1, 11):
        report.record_client_level(r, ReleaseEvent(r, 1.0, 1.0, 4, 4))
    section = report.to_json()["client_level"]
    assert section["adjacency"].startswith("zero-out") and "NOT add/remove" in section["adjacency"]
    assert section["sample_rate"] == 1.0 and "zero-out" in section["statement"]
    assert section["epsilon"] == pytest.approx(recompute_client_epsilon(section), rel=1e-9)
    assert section["releases"][0]["included_clients"] == 4  # public under zero-out: the sample size is fixed

    poisson = RunConfig(client_dp="central", client_clip_norm=1.0, client_noise_multiplier=1.0, secagg=False,
                        client_sampling="poisson", fraction_train=0.5, out=tmp_path)
    report = PrivacyReport(poisson, 0.9, client_noise_multiplier=1.0)
    report.record_client_level(1, ReleaseEvent(1, 1.0, 0.5, 3, 2.5))
    section = report.to_json()["client_level"]
    assert section["adjacency"].startswith("add/remove")
    assert all("included_clients" not in r for r in section["releases"]), section["releases"]
    assert report.client_level_state()[0]["included_clients"] == 3  # the checkpoint keeps it for a resume


class _ZeroSampler:
    def random(self) -> float:
        return 1.0  # never below the fraction: Poisson sampling draws nobody


@pytest.mark.usefixtures("task_identity")
def test_a_poisson_round_that_samples_nobody_still_releases_noise() -> None:
    n = 4
    dp = ClientLevelDP(FedAvg(min_available_nodes=n, min_train_nodes=n), mode="central", noise_multiplier=1.0,
                       clip_norm=1.0, num_clients=n, expected_clients=n, sampling="poisson", fraction=0.5,
                       sampler=_ZeroSampler())  # type: ignore[arg-type]
    assert configure_round(dp, n) == []
    arrays, metrics = dp.aggregate_train(1, [])
    assert arrays is not None and dp.last_event is not None and dp.last_event.included_clients == 0
    moved = float(np.max(np.abs(arrays["w"].numpy() - GLOBAL["w"])))
    assert moved > 0, "a noise-only release must carry the noise"
    assert dict(metrics or {}).get("num-examples", 1.0) == 1.0  # the participant count is not published
