"""``fedshield simulate``: many virtual clients on this machine, with DP-SGD and secure aggregation by default."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import RunConfig, load_config_file
from . import _options as o
from ._common import configure_logging, errors_to_exit
from ._report import print_summary, round_line

if TYPE_CHECKING:  # torch, Flower's engine and the rest load when a command runs, not for `fedshield --help`
    from ..server.records import RoundRecord, RunSummary

__all__ = ["simulate_command", "build_config"]

console = Console(stderr=False)


def build_config(config_file: Path | None, flags: dict[str, Any]) -> RunConfig:
    """Defaults < config file < flags given on the command line."""
    base = load_config_file(config_file) if config_file is not None else RunConfig()
    given = {k: v for k, v in flags.items() if v is not None}
    return RunConfig.from_mapping(given, base=base) if given else base


def simulate_command(
    clients: int | None = typer.Option(None, "--clients", help="Number of virtual clients (default 5)."),
    rounds: o.Rounds = None,
    task: o.Task = None,
    data: o.Data = None,
    text_column: o.TextColumn = None,
    label_column: o.LabelColumn = None,
    partition: o.Partition = None,
    epsilon: o.Epsilon = None,
    delta: o.Delta = None,
    noise_multiplier: o.NoiseMultiplier = None,
    max_grad_norm: o.MaxGradNorm = None,
    sample_rate: o.SampleRate = None,
    lr: o.Lr = None,
    no_dp: o.NoDp = False,
    no_secagg: o.NoSecagg = False,
    secagg_shares: o.SecaggShares = None,
    secagg_threshold: o.SecaggThreshold = None,
    local_epochs: o.LocalEpochs = None,
    fraction_train: o.FractionTrain = None,
    fraction_evaluate: o.FractionEvaluate = None,
    seed: o.Seed = None,
    accountant: o.Accountant = None,
    grad_sample_mode: o.GradSampleMode = None,
    strategy: o.Strategy = None,
    client_dp: o.ClientDp = None,
    client_noise_multiplier: o.ClientNoiseMultiplier = None,
    client_clip_norm: o.ClientClipNorm = None,
    client_epsilon: o.ClientEpsilon = None,
    max_update_norm: o.MaxUpdateNorm = None,
    quantize: o.Quantize = None,
    device: o.Device = None,
    max_physical_batch_size: o.MaxPhysicalBatchSize = None,
    amp: o.Amp = False,
    round_timeout: o.RoundTimeout = None,
    dispatch: o.Dispatch = None,
    node_wait_timeout: o.NodeWaitTimeout = None,
    dp_mode: o.DpMode = None,
    min_honest: o.MinHonest = None,
    ddp_records: o.DdpRecords = None,
    out: o.Out = None,
    config: o.ConfigFile = None,
    resume: o.Resume = None,
    force: o.Force = False,
    backend: str | None = typer.Option(None, "--backend", help="Where the clients run: local (forked worker processes, no Ray start; the default) | ray (Ray actors; implied by --ray-address and --gpus-per-client)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Run on an existing Ray cluster (e.g. auto)."),
    cpus_per_client: float = typer.Option(1.0, "--cpus-per-client", help="Ray CPUs reserved per virtual client."),
    gpus_per_client: float = typer.Option(0.0, "--gpus-per-client", help="GPUs Ray reserves per virtual client: a fraction in [0, 1] (0.25: four clients share a GPU) or a whole number."),
    verbose: o.Verbose = False,
) -> None:
    """Run a private federated training of many clients on this machine."""
    params = dict(locals())
    configure_logging(verbose)
    flags: dict[str, Any] = {
        **o.run_flags(params), "num_clients": clients,
        "data": str(data.expanduser().resolve()) if data is not None else None,  # Ray workers read it too
        "text_column": text_column, "label_column": label_column,
    }
    with errors_to_exit():
        ckpt = None
        o.check_resume_or_force(resume, force)
        if resume is not None:
            cfg, ckpt = _resume_config(resume, config, flags)
        else:
            cfg = build_config(config, flags)
        _warn_risky(cfg)
        from ..simulation.engine import choose_backend

        backend = choose_backend(backend, ray_address=ray_address, gpus_per_client=gpus_per_client)
        _check_resources(cfg, cpus=cpus_per_client, gpus=gpus_per_client, ray_address=ray_address)
        if ckpt is None:
            from ..server.run_dir import claim_run_dir

            from ..simulation.run import preflight

            preflight(cfg)  # bad input fails before --force removes anything
            cfg = cfg.replace(out=claim_run_dir(cfg.out, force=force))
        summary = _run(cfg, ray_address=ray_address, cpus=cpus_per_client, gpus=gpus_per_client, verbose=verbose,
                       resume=ckpt, backend=backend)
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
    cfg: RunConfig, *, ray_address: str | None, cpus: float, gpus: float, verbose: bool, resume: Any = None,
    backend: str | None = None,
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
            verbose=verbose, resume=resume, backend=backend,
        )
    console.print(f"finished in {time.monotonic() - start:.1f} s")
    return summary


def _round_line(record: RoundRecord) -> str:
    return round_line(record)


def _print_summary(summary: RunSummary) -> None:
    print_summary(summary, console)
