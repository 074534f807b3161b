"""``fedshield simulate``: many virtual clients on this machine, with DP-SGD and secure aggregation by default."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import RunConfig, load_config_file
from ..server.runner import RoundRecord, RunSummary
from ._common import configure_logging, errors_to_exit
from ._report import print_summary, round_line

__all__ = ["simulate_command", "build_config"]

console = Console(stderr=False)


def build_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    """Defaults < config file < flags given on the command line."""
    base = load_config_file(config_file) if config_file is not None else RunConfig()
    given = {k: v for k, v in flags.items() if v is not None}
    return RunConfig.from_mapping(given, base=base) if given else base


def simulate_command(
    clients: int | None = typer.Option(None, "--clients", help="Number of virtual clients (default 5)."),
    rounds: int | None = typer.Option(None, "--rounds", help="Federated rounds (default 20)."),
    task: str | None = typer.Option(None, "--task", help="digits | breast-cancer | package.module:factory."),
    partition: str | None = typer.Option(None, "--partition", help="iid | dirichlet:ALPHA | shard:N."),
    epsilon: float | None = typer.Option(None, "--epsilon", help="Record-level budget for the whole run (default 8)."),
    delta: float | None = typer.Option(None, "--delta", help="DP delta (default 1e-5)."),
    noise_multiplier: float | None = typer.Option(None, "--noise-multiplier", help="Fix sigma instead of calibrating it."),
    max_grad_norm: float | None = typer.Option(None, "--max-grad-norm", help="Per-example clipping bound C."),
    sample_rate: float | None = typer.Option(None, "--sample-rate", help="Poisson sampling rate q = 1/steps per epoch."),
    lr: float | None = typer.Option(None, "--lr", help="Client learning rate."),
    no_dp: bool = typer.Option(False, "--no-dp", help="Train WITHOUT differential privacy (prints a warning)."),
    no_secagg: bool = typer.Option(False, "--no-secagg", help="Send updates in clear to the server (prints a warning)."),
    local_epochs: int | None = typer.Option(None, "--local-epochs", help="Local epochs per round."),
    fraction_train: float | None = typer.Option(None, "--fraction-train", help="Fraction of clients trained per round (default 1)."),
    fraction_evaluate: float | None = typer.Option(None, "--fraction-evaluate", help="Fraction of clients that evaluate the global model per round (default 1; 0: server-side only)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for model init, partitions and (simulation) noise."),
    accountant: str | None = typer.Option(None, "--accountant", help="prv (default, tightest) | rdp."),
    grad_sample_mode: str | None = typer.Option(None, "--grad-sample-mode", help="Opacus per-sample gradients: hooks | ghost | functorch | ew."),
    strategy: str | None = typer.Option(None, "--strategy", help="fedavg | fedavgm | fedprox | fedadam | fedyogi | fedadagrad | krum | multikrum | bulyan | fedmedian | fedtrimmedavg (parameters: [strategy] table in --config)."),
    client_dp: str | None = typer.Option(None, "--client-dp", help="Client-level DP: off | central | distributed."),
    client_noise_multiplier: float | None = typer.Option(None, "--client-noise-multiplier", help="Client-level noise multiplier z."),
    client_clip_norm: float | None = typer.Option(None, "--client-clip-norm", help="Client-level update clipping bound."),
    client_epsilon: float | None = typer.Option(None, "--client-epsilon", help="Calibrate z to this client-level epsilon."),
    max_update_norm: float | None = typer.Option(None, "--max-update-norm", help="Reject updates whose norm exceeds this."),
    quantize: int | None = typer.Option(None, "--quantize", help="Send updates quantized to 8 or 16 bits (under SecAgg+: into its field)."),
    device: str | None = typer.Option(None, "--device", help="Where clients train: auto (a CUDA GPU if there is one, else the CPU) | cpu | cuda | cuda:N."),
    max_physical_batch_size: int | None = typer.Option(None, "--max-physical-batch-size", help="Cap the examples per DP-SGD forward/backward pass to bound memory (0: no cap; epsilon unchanged)."),
    amp: bool = typer.Option(False, "--amp", help="bf16 autocast (needs --grad-sample-mode hooks or functorch)."),
    round_timeout: float | None = typer.Option(None, "--round-timeout", help="Seconds to wait for clients' replies in each exchange of a round; later ones are left out (default 600)."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/latest)."),
    config: Path | None = typer.Option(None, "--config", help="TOML file with the same keys as these flags."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Run on an existing Ray cluster (e.g. auto)."),
    cpus_per_client: float = typer.Option(1.0, "--cpus-per-client", help="Ray CPUs reserved per virtual client."),
    gpus_per_client: float = typer.Option(0.0, "--gpus-per-client", help="GPUs Ray reserves per virtual client: a fraction in [0, 1] (0.25: four clients share a GPU) or a whole number."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's logs."),
) -> None:
    """Run a private federated training of many clients on this machine."""
    configure_logging(verbose)
    flags: dict[str, Any] = {
        "num_clients": clients, "num_rounds": rounds, "task": task, "partition": partition, "epsilon": epsilon,
        "delta": delta, "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm,
        "sample_rate": sample_rate, "lr": lr, "local_epochs": local_epochs, "seed": seed,
        "fraction_train": fraction_train, "fraction_evaluate": fraction_evaluate, "accountant": accountant,
        "grad_sample_mode": grad_sample_mode, "out": out, "quantize": quantize,
        "strategy": strategy, "client_dp": client_dp, "client_noise_multiplier": client_noise_multiplier,
        "client_clip_norm": client_clip_norm, "client_epsilon": client_epsilon, "max_update_norm": max_update_norm,
        "dp": False if no_dp else None, "secagg": False if no_secagg else None,
        "device": device, "max_physical_batch_size": max_physical_batch_size, "amp": True if amp else None,
        "round_timeout": round_timeout,
    }
    with errors_to_exit():
        ckpt = None
        if resume is not None:
            cfg, ckpt = _resume_config(resume, config, flags)
        else:
            cfg = build_config(config, flags)
        _warn_risky(cfg)
        _check_resources(cfg, cpus=cpus_per_client, gpus=gpus_per_client, ray_address=ray_address)
        summary = _run(cfg, ray_address=ray_address, cpus=cpus_per_client, gpus=gpus_per_client, verbose=verbose,
                       resume=ckpt)
    _print_summary(summary)


def _resume_config(run_dir: Path, config_file: Path | None, flags: dict[str, Any]):  # type: ignore[no-untyped-def]
    from ..errors import ConfigError
    from ..simulation.run import load_resume

    given = sorted(k.replace("_", "-") for k, v in flags.items() if v is not None)
    if given or config_file is not None:
        raise ConfigError(
            f"--resume continues a run with its original settings; drop {', '.join(given) or '--config'} "
            "(start a new run with --out to change settings)"
        )
    cfg, ckpt = load_resume(run_dir)
    console.print(f"resuming {run_dir} after round {ckpt.server_round} of {cfg.num_rounds}")
    return cfg, ckpt


def _warn_risky(cfg: RunConfig) -> None:
    if not cfg.dp:
        console.print("[bold red]WARNING[/]: --no-dp: clients train WITHOUT differential privacy; "
                      "updates can reveal individual records. Remove --no-dp before using real data.")
    if not cfg.secagg:
        console.print("[bold yellow]WARNING[/]: --no-secagg: the server sees every client's update in clear.")


def _check_resources(cfg: RunConfig, *, cpus: float, gpus: float, ray_address: str | None) -> None:
    from ..simulation.run import check_client_resources

    check_client_resources(cfg, cpus_per_client=cpus, gpus_per_client=gpus, ray_address=ray_address)
    if ray_address is not None:
        return
    import torch

    if gpus == 0 and cfg.device == "auto" and torch.cuda.is_available():
        console.print("[bold yellow]WARNING[/]: this machine has a CUDA GPU, but --gpus-per-client is 0: Ray hides "
                      "the GPU from the virtual clients, so they train on the CPU. Add e.g. --gpus-per-client 0.5 "
                      "(two clients per GPU) to train on it.")
    if gpus > 0 and cfg.device == "cpu":
        console.print(f"[bold yellow]WARNING[/]: --gpus-per-client {gpus:g} reserves GPU share for clients that "
                      "train on the CPU (--device cpu): drop one of the two.")


def _run(
    cfg: RunConfig, *, ray_address: str | None, cpus: float, gpus: float, verbose: bool, resume: Any = None
) -> RunSummary:
    from ..simulation.run import simulate

    console.print(
        f"fedshield simulate: task={cfg.task} clients={cfg.num_clients} rounds={cfg.num_rounds} "
        f"partition={cfg.partition} dp={'on' if cfg.dp else 'OFF'} secagg={'on' if cfg.secagg else 'off'} out={cfg.out}"
    )
    progress = Progress(
        TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console,
        transient=False,
    )
    start = time.monotonic()
    with progress:
        bar = progress.add_task("rounds", total=cfg.num_rounds, completed=resume.server_round if resume else 0)

        def on_round(record: RoundRecord) -> None:
            progress.console.print(_round_line(record))
            progress.update(bar, completed=record.server_round)

        summary = simulate(
            cfg, on_round=on_round, cpus_per_client=cpus, gpus_per_client=gpus, ray_address=ray_address,
            verbose=verbose, resume=resume,
        )
    console.print(f"finished in {time.monotonic() - start:.1f} s")
    return summary


def _round_line(record: RoundRecord) -> str:
    return round_line(record)


def _print_summary(summary: RunSummary) -> None:
    print_summary(summary, console)
