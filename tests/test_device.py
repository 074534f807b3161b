"""Training on a device: choosing it, plumbing it from the run to each site, bounded memory and bf16 autocast.

The CPU tests run everywhere. The CUDA tests need a GPU and are skipped without one; they check what only a GPU can
show: the weights come back on the CPU, the noise is drawn on the GPU with the right variance, the clipping bound
holds in every mode (ghost clipping runs with TF32 off), and epsilon is what the same round costs on the CPU.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from fedshield import protocol as P
from fedshield.cli import cli
from fedshield.client.node_config import DEVICE, NUM_PARTITIONS, PARTITION_ID
from fedshield.client.site import Site, resolve_site
from fedshield.client.trainer import evaluate_round, train_round
from fedshield.config import RoundSettings, RunConfig
from fedshield.dataspec import Dataset
from fedshield.device import resolve_device
from fedshield.errors import ConfigError, PrivacyError
from fedshield.privacy.dpsgd import train_dp_sgd
from fedshield.training import device_generator, evaluate, make_generator, train_plain
from fedshield.simulation.run import check_client_resources
from fedshield.tasks import get_task

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: run on a machine with one and a CUDA torch")
runner = CliRunner()


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine as one without a GPU, whatever it has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def _settings(**kw: Any) -> RoundSettings:
    base = dict(run_id="r", server_round=1, num_rounds=1, task="breast-cancer", partition="iid", seed=0,
                local_epochs=2, lr=0.5, sample_rate=0.25, dp=True, noise_multiplier=1.0, max_grad_norm=1.0,
                target_epsilon=0.0, delta=1e-5, accountant="prv", grad_sample_mode="hooks")
    return RoundSettings(**{**base, **kw})


def _site(tmp_path: Path, device: str = "cpu", n: int = 120) -> Site:
    task = get_task("breast-cancer")
    data = task.load_bundled()
    subset = Dataset(data.x[:n], data.y[:n])
    return Site("client-0", task, subset, subset, tmp_path, None, 0, torch.device(device))


def _global(site: Site) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in site.task.new_model(0).state_dict().items()}


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().cpu().flatten() for p in model.parameters()])


def _one_digit() -> tuple[Any, Dataset]:
    task = get_task("digits")
    return task, task.load_bundled().subset(np.arange(3, 4))


def _clipped_norm_ratio(mode: str, *, device: str, amp: bool = False, clip: float = 0.05) -> float:
    """One example, q = 1, no noise, lr = 1: the parameter change IS that example's clipped gradient."""
    task, one = _one_digit()
    model = task.new_model(0)
    before = _flat(model)
    train_dp_sgd(model, one, noise_multiplier=0.0, max_grad_norm=clip, sample_rate=1.0, epochs=1, lr=1.0,
                 loss_fn=nn.CrossEntropyLoss(), generator=make_generator(0), grad_sample_mode=mode, device=device,
                 amp=amp)
    return float((_flat(model) - before).norm()) / clip


# ------------------------------------------------------------------------------------------------ resolve_device


def test_auto_is_the_cpu_without_cuda(no_cuda: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_names_the_fix(no_cuda: None, spec: str) -> None:
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU here") as err:
        resolve_device(spec)
    assert "device cpu" in str(err.value) and "node config key device=cpu" in str(err.value)


def test_a_gpu_index_beyond_the_machine_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"has 1 CUDA GPU\(s\) \(cuda:0 to cuda:0"):
        resolve_device("cuda:3")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "cuda0", "", "mps", 3])
def test_malformed_device_specs_are_refused(spec: Any) -> None:
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device(spec)


# ------------------------------------------------------------------------------------------------ settings


def test_run_config_hardware_fields_validate_and_round_trip() -> None:
    cfg = RunConfig(device=" CUDA:1 ", max_physical_batch_size=16, amp=True, grad_sample_mode="hooks")
    assert cfg.device == "cuda:1"
    assert RunConfig.from_mapping(cfg.to_flat_dict()) == cfg
    flower = {"device": "cuda:1", "max-physical-batch-size": 16, "amp": True, "grad-sample-mode": "hooks"}
    assert RunConfig.from_mapping(flower, zero_is_unset=True) == cfg
    assert RunConfig.from_mapping({"max-physical-batch-size": 0}, zero_is_unset=True).max_physical_batch_size == 0
    assert (RunConfig().device, RunConfig().max_physical_batch_size, RunConfig().amp) == ("auto", 0, False)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"max_physical_batch_size": -1}, "max-physical-batch-size (0: no cap) must be a whole number >= 0"),
        ({"max_physical_batch_size": 2.5}, "must be a whole number"),
        ({"amp": "yes"}, "amp must be true or false"),
        ({"amp": True}, "needs grad-sample-mode hooks or functorch, got 'ghost'"),
        ({"amp": True, "grad_sample_mode": "ew"}, "expanded weights do not support autocast"),
    ],
)
def test_bad_hardware_settings_fail_naming_the_fix(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(changes)
    assert expected in str(err.value)


def test_round_settings_carry_the_hardware_fields_and_accept_older_servers() -> None:
    settings = _settings(device="cuda:0", max_physical_batch_size=8, amp=True)
    assert RoundSettings.from_record_dict(settings.to_record_dict()) == settings
    older = {k: v for k, v in settings.to_record_dict().items() if k not in ("device", "max-physical-batch-size", "amp")}
    back = RoundSettings.from_record_dict(older)
    assert (back.device, back.max_physical_batch_size, back.amp) == ("auto", 0, False)
    with pytest.raises(ConfigError, match="round config: device must be"):
        RoundSettings.from_record_dict({**settings.to_record_dict(), "device": "tpu"})
    with pytest.raises(ConfigError, match="round config: --amp"):
        _settings(amp=True, grad_sample_mode="ghost")


def test_the_sites_node_config_device_wins_over_the_run(tmp_path: Path, no_cuda: None) -> None:
    node = {PARTITION_ID: 0, NUM_PARTITIONS: 2}
    settings = _settings(sim_state_root=str(tmp_path), device="cuda")
    assert resolve_site({**node, DEVICE: "cpu"}, settings).device == torch.device("cpu")
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
        resolve_site(node, settings)  # the run's cuda, on a site without one: a clear error reply
    with pytest.raises(ConfigError, match="node config device='gpu'"):
        resolve_site({**node, DEVICE: "gpu"}, settings)
    assert resolve_site({**node, DEVICE: ""}, _settings(sim_state_root=str(tmp_path))).device == torch.device("cpu")


# ------------------------------------------------------------------------------------------------ CPU training


def test_cpu_noise_uses_the_callers_generator_itself() -> None:
    g = make_generator(0)
    assert device_generator(g, torch.device("cpu")) is g


def test_an_explicit_cpu_device_trains_exactly_as_before(tmp_path: Path) -> None:
    task = get_task("breast-cancer")
    data = task.load_bundled().subset(np.arange(100))
    runs = []
    for device in (None, "cpu", torch.device("cpu")):
        model = task.new_model(0)
        result = train_dp_sgd(model, data, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, epochs=2,
                              lr=0.5, loss_fn=task.loss_fn(), generator=make_generator(7), device=device)
        runs.append((_flat(model), result))
    for params, result in runs[1:]:
        assert torch.equal(params, runs[0][0]) and result == runs[0][1]


def test_train_round_on_cpu_returns_cpu_tensors_and_the_ledger_figures(tmp_path: Path) -> None:
    site = _site(tmp_path)
    glob = _global(site)
    outcome = train_round(site, _settings(), glob)
    assert all(v.device.type == "cpu" for v in outcome.state_dict.values())
    assert outcome.metrics[P.STEPS] == 8.0 and outcome.metrics[P.EPSILON] > 0
    metrics = evaluate_round(site, _settings(), outcome.state_dict)
    assert 0 <= metrics[P.EVAL_ACCURACY] <= 1


def test_a_small_physical_batch_trains_and_charges_like_the_whole_batch(tmp_path: Path) -> None:
    """BatchMemoryManager splits each Poisson batch (~30 examples) into passes of 4: same logical steps, noise
    and parameters as the unsplit run, and the same ledger."""
    outcomes = []
    for mpbs in (0, 4):
        site = _site(tmp_path / f"mpbs-{mpbs}")
        outcomes.append(train_round(site, _settings(max_physical_batch_size=mpbs), _global(site)))
    whole, split = outcomes
    for key, value in whole.state_dict.items():
        torch.testing.assert_close(split.state_dict[key], value, rtol=1e-5, atol=1e-6)
    assert split.metrics[P.STEPS] == whole.metrics[P.STEPS] == 8.0
    assert split.metrics[P.EPSILON] == whole.metrics[P.EPSILON]
    assert split.train_loss == pytest.approx(whole.train_loss, rel=1e-5)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_bf16_autocast_keeps_the_clipping_bound_on_cpu(mode: str) -> None:
    # Opacus measures bf16 per-example gradients in bf16 (clipped norms came out 0.7% over the bound); fedshield
    # casts them to fp32 first, so the norm is that of the vector it clips.
    assert _clipped_norm_ratio(mode, device="cpu", amp=True) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("mode", ["ghost", "ew"])
def test_bf16_autocast_is_refused_where_the_bound_would_not_hold(mode: str) -> None:
    with pytest.raises(PrivacyError, match="amp"):
        _clipped_norm_ratio(mode, device="cpu", amp=True)


def test_plain_training_under_autocast_learns() -> None:
    task = get_task("breast-cancer")
    data = task.load_bundled()
    model = task.new_model(0)
    result = train_plain(model, data, sample_rate=0.25, epochs=3, lr=0.5, loss_fn=task.loss_fn(),
                         generator=make_generator(0), amp=True)
    assert math.isfinite(result.mean_loss) and evaluate(model, data, task.loss_fn())[1] > 0.8


# ------------------------------------------------------------------------------------------------ simulation resources


@pytest.mark.parametrize("gpus", [1.5, -0.1, float("nan"), float("inf")])
def test_impossible_gpu_shares_are_refused(gpus: float) -> None:
    with pytest.raises(ConfigError, match=r"a share of one GPU in \[0, 1\].*or a whole number"):
        check_client_resources(RunConfig(), cpus_per_client=1, gpus_per_client=gpus)


def test_gpu_shares_on_a_machine_without_gpu_fail_at_start(no_cuda: None) -> None:
    for gpus in (0.5, 1, 2):
        with pytest.raises(ConfigError, match="sees no CUDA GPU on this machine, so Ray could never start a client"):
            check_client_resources(RunConfig(), cpus_per_client=1, gpus_per_client=gpus)
    # A Ray cluster's GPUs are not this machine's: not checked here.
    check_client_resources(RunConfig(), cpus_per_client=1, gpus_per_client=0.5, ray_address="auto")
    check_client_resources(RunConfig(), cpus_per_client=1, gpus_per_client=0)


def test_more_gpus_per_client_than_the_machine_has_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    check_client_resources(RunConfig(), cpus_per_client=1, gpus_per_client=1)
    with pytest.raises(ConfigError, match="more GPUs per client than this machine has"):
        check_client_resources(RunConfig(), cpus_per_client=1, gpus_per_client=2)


def test_cuda_clients_without_a_gpu_share_are_refused() -> None:
    with pytest.raises(ConfigError, match="Ray hides the GPUs from virtual clients that reserve none"):
        check_client_resources(RunConfig(device="cuda"), cpus_per_client=1, gpus_per_client=0)
    with pytest.raises(ConfigError, match="--cpus-per-client must be a number > 0"):
        check_client_resources(RunConfig(), cpus_per_client=0, gpus_per_client=0)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--gpus-per-client", "1.5"], "--gpus-per-client must be a share of one GPU"),
        (["--device", "gpu"], "device must be auto, cpu, cuda or cuda:N"),
        (["--amp"], "needs grad-sample-mode hooks or functorch"),
        (["--max-physical-batch-size", "-2"], "max-physical-batch-size (0: no cap) must be a whole number >= 0"),
        (["--device", "cuda"], "Ray hides the GPUs"),
    ],
)
def test_simulate_flags_fail_in_one_line_before_ray(tmp_path: Path, args: list[str], expected: str) -> None:
    out = tmp_path / "run"
    result = runner.invoke(cli, ["simulate", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert not out.exists()


@pytest.mark.skipif(HAS_CUDA, reason="checks a machine without a CUDA GPU")
def test_simulate_with_a_gpu_share_and_no_gpu_fails_at_start(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = runner.invoke(cli, ["simulate", "--out", str(out), "--gpus-per-client", "0.5"])
    assert result.exit_code == 2 and "sees no CUDA GPU on this machine" in result.output, result.output
    assert not out.exists()


def test_ghost_on_cuda_switches_tf32_off_and_restores_it() -> None:
    # Only torch's flags are touched, so this runs without a GPU.
    from fedshield.privacy.dpsgd import _exact_fp32

    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)  # noqa: E731
    before = flags()
    with _exact_fp32(torch.device("cuda", 0), "ghost"):
        assert flags() == (False, False)
    assert flags() == before
    torch.backends.cudnn.allow_tf32 = True
    try:
        with _exact_fp32(torch.device("cuda", 0), "hooks"), _exact_fp32(torch.device("cpu"), "ghost"):
            assert torch.backends.cudnn.allow_tf32  # hooks clip what they measure; the CPU has no TF32
    finally:
        torch.backends.cudnn.allow_tf32 = before[1]


# ------------------------------------------------------------------------------------------------ CUDA


@needs_cuda
@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch"])
def test_train_round_on_cuda_returns_cpu_weights_and_the_cpu_epsilon(tmp_path: Path, mode: str) -> None:
    settings = _settings(grad_sample_mode=mode)
    cpu_site, gpu_site = _site(tmp_path / "cpu"), _site(tmp_path / "gpu", device="cuda")
    on_cpu = train_round(cpu_site, settings, _global(cpu_site))
    glob = _global(gpu_site)
    on_gpu = train_round(gpu_site, settings, glob)
    assert all(v.device.type == "cpu" for v in on_gpu.state_dict.values())
    assert set(on_gpu.state_dict) == set(glob) and any(not torch.equal(on_gpu.state_dict[k], glob[k]) for k in glob)
    for key in (P.EPSILON, P.STEPS, P.ROUNDS_TRAINED):
        assert on_gpu.metrics[key] == on_cpu.metrics[key], key
    assert all(isinstance(v, float) and math.isfinite(v) for v in on_gpu.metrics.values())
    metrics = evaluate_round(gpu_site, settings, on_gpu.state_dict)
    assert metrics == pytest.approx(evaluate_round(cpu_site, settings, on_gpu.state_dict), abs=1e-5)


@needs_cuda
@pytest.mark.parametrize(("mode", "amp"), [("hooks", False), ("ghost", False), ("functorch", False),
                                           ("hooks", True), ("functorch", True)])
def test_the_clipping_bound_holds_on_cuda(mode: str, amp: bool) -> None:
    """Ghost clipping on CUDA with TF32 would clip by fp32 norms a gradient computed in TF32: fedshield turns TF32
    off around it (and restores the flags)."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    for clip in (1e-3, 0.05):
        assert _clipped_norm_ratio(mode, device="cuda", amp=amp, clip=clip) == pytest.approx(1.0, abs=1e-4)
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


@needs_cuda
def test_cuda_noise_has_variance_sigma_squared_c_squared() -> None:
    task = get_task("breast-cancer")
    data = task.load_bundled().subset(np.arange(32))
    sigma, clip, n = 0.7, 0.5, 32
    models = []
    for s in (0.0, sigma):
        model = task.new_model(0)
        train_dp_sgd(model, data, noise_multiplier=s, max_grad_norm=clip, sample_rate=1.0, epochs=1, lr=1.0,
                     loss_fn=task.loss_fn(), generator=make_generator(1), device="cuda")
        assert all(p.device.type == "cuda" for p in model.parameters())
        models.append(_flat(model))
    noise = (models[0] - models[1]) * n
    d = noise.numel()
    assert abs(float(noise.var()) / (sigma * clip) ** 2 - 1) < 5 * math.sqrt(2 / (d - 1))


@needs_cuda
def test_cuda_training_is_reproducible_from_the_seed_and_splits_like_cpu() -> None:
    task = get_task("digits")
    data = task.load_bundled().subset(np.arange(300))
    runs = []
    for mpbs in (0, 0, 16):
        model = task.new_model(0)
        result = train_dp_sgd(model, data, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25, epochs=2,
                              lr=0.5, loss_fn=task.loss_fn(), generator=make_generator(5), grad_sample_mode="ghost",
                              device="cuda", max_physical_batch_size=mpbs)
        runs.append((_flat(model), result.history))
    for params, history in runs[1:]:
        torch.testing.assert_close(params, runs[0][0], rtol=1e-4, atol=1e-5)
        assert history == runs[0][1] == ((1.0, 0.25, 8),)

