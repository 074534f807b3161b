"""``fedshield simulate``: many virtual clients on this machine, with DP-SGD and secure aggregation by default."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..config import RunConfig, load_config_file
from ..server.runner import RoundRecord, RunSummary
from ._common import configure_logging, errors_to_exit

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
    seed: int | None = typer.Option(None, "--seed", help="Seed for model init, partitions and (simulation) noise."),
    accountant: str | None = typer.Option(None, "--accountant", help="prv (default, tightest) | rdp."),
    grad_sample_mode: str | None = typer.Option(None, "--grad-sample-mode", help="Opacus per-sample gradients: hooks | ghost | functorch | ew."),
    out: Path | None = typer.Option(None, "--out", help="Run directory (default runs/latest)."),
    config: Path | None = typer.Option(None, "--config", help="TOML file with the same keys as these flags."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this directory from its last checkpoint."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="Run on an existing Ray cluster (e.g. auto)."),
    cpus_per_client: float = typer.Option(1.0, "--cpus-per-client", help="Ray CPUs reserved per virtual client."),
    gpus_per_client: float = typer.Option(0.0, "--gpus-per-client", help="GPU fraction per virtual client."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Flower's and Ray's logs."),
) -> None:
    """Run a private federated training of many clients on this machine."""
    configure_logging(verbose)
    flags: dict[str, Any] = {
        "num_clients": clients, "num_rounds": rounds, "task": task, "partition": partition, "epsilon": epsilon,
        "delta": delta, "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm,
        "sample_rate": sample_rate, "lr": lr, "local_epochs": local_epochs, "seed": seed, "accountant": accountant,
        "grad_sample_mode": grad_sample_mode, "out": out,
        "dp": False if no_dp else None, "secagg": False if no_secagg else None,
    }
    with errors_to_exit():
        ckpt = None
        if resume is not None:
            cfg, ckpt = _resume_config(resume, config, flags)
        else:
            cfg = build_config(config, flags)
        _warn_risky(cfg)
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
    row = record.row
    acc = "n/a" if row["accuracy"] is None else f"{100 * row['accuracy']:.1f}%"
    loss = "n/a" if row["loss"] is None else f"{row['loss']:.3f}"
    eps = [e for e in record.client_epsilons.values() if e is not None]
    eps_text = f"eps {min(eps):.2f}..{max(eps):.2f}" if eps else "eps n/a"
    extra = ""
    if row["clients_refused"]:
        extra += f"  [yellow]{row['clients_refused']} refused (budget)[/]"
    if row["clients_failed"]:
        extra += f"  [red]{row['clients_failed']} failed[/]"
    return (
        f"round {record.server_round:>3}/{record.num_rounds}  acc {acc:>6}  loss {loss}  "
        f"trained {row['clients_trained']}/{row['clients_sampled']}  {eps_text}  {row['round_time_s']:.1f}s{extra}"
    )


def _print_summary(summary: RunSummary) -> None:
    privacy = summary.privacy
    if not privacy:
        return
    table = Table(title="record-level privacy spent per client")
    for col in ("client", "epsilon", "rounds", "steps", "stopped on budget"):
        table.add_column(col)
    for name, c in privacy["clients"].items():
        eps = "inf (no DP)" if c["epsilon"] is None else f"{c['epsilon']:.3f}"
        stopped = f"round {c['stopped_round']}" if c["stopped_on_budget"] else "no"
        table.add_row(name, eps, str(c["rounds_trained"]), str(c["steps"]), stopped)
    console.print(table)
    g = privacy["guarantee"]
    mech = privacy["mechanism"]
    if summary.config.dp and g["epsilon"] is not None and math.isfinite(g["epsilon"]):
        console.print(
            f"guarantee: ({g['epsilon']:.3f}, {g['delta']:g})-DP per record (max over clients); "
            f"sigma={mech['noise_multiplier']:.4f} q={mech['sample_rate']:g} C={mech['max_grad_norm']:g} "
            f"accountant={mech['accountant']}"
        )
    else:
        console.print(f"guarantee: {g['statement']}")
    last = summary.rounds[-1] if summary.rounds else {}
    if last.get("accuracy") is not None:
        console.print(f"final server test accuracy: {100 * last['accuracy']:.1f}%")
    console.print(f"run directory: {summary.config.out}")
