"""``fedshield server``: the coordinator of a real federation of processes (one ``fedshield client`` per site).

Exit codes: 0 the run completed; 1 the run failed (also: fewer than --min-clients sites connected within
--node-wait-timeout); 2 bad input (flags, keys, ports), always as one line ``error: ...``; 130 interrupted (Ctrl-C
or SIGTERM; the run is stopped and every process we started is stopped by PID).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from ..config import RunConfig
from ..errors import FedshieldError
from . import _options as o
from ._common import configure_logging, errors_to_exit, fail, printable, sigterm_as_interrupt
from ._report import print_summary, round_line
from .simulate import build_config

if TYPE_CHECKING:
    from ..deploy.coordinator import FedshieldServer, ServerOptions
    from ..server.records import RoundRecord

__all__ = ["server_command"]

# soft_wrap: a server runs for hours with its output in a log file; never break lines at 80 columns.
console = Console(stderr=False, highlight=False, soft_wrap=True)
_LOG_TAIL_LINES = 40
#: ``fedshield server --max-update-norm`` without SecAgg+ when none is given: honest digits updates at the default
#: settings measured 2.12-2.18 (3 clients x 3 rounds, DP eps 8); 10 leaves 4.6x headroom and rejects a 20x
#: scaled update. Other tasks: set --max-update-norm to a few times the norms their honest rounds report.
DEFAULT_MAX_UPDATE_NORM = 10.0


def server_command(
    keys: Path | None = typer.Option(None, "--keys", help="Key directory from `fedshield keys init` (TLS + node keys)."),
    address: str = typer.Option("0.0.0.0:9092", "--address", help="Fleet API HOST:PORT the sites connect to."),
    control_port: int = typer.Option(8000, "--control-port", help="Local Control API port (bound to 127.0.0.1 only)."),
    min_clients: int | None = typer.Option(None, "--min-clients", help="Clients that must be online to train (default 5)."),
    rounds: o.Rounds = None,
    task: o.Task = None,
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
    node_wait_timeout: o.NodeWaitTimeout = None,
    dp_mode: o.DpMode = None,
    min_honest: o.MinHonest = None,
    ddp_records: o.DdpRecords = None,
    out: o.Out = None,
    config: o.ConfigFile = None,
    insecure: bool = typer.Option(False, "--insecure", help="No TLS, no node authentication: local experiments ONLY."),
    resume: o.Resume = None,
    force: o.Force = False,
    verbose: o.Verbose = False,
) -> None:
    """Run a federated training with real clients: start the SuperLink, register the sites' keys, train, report."""
    params = dict(locals())
    configure_logging(verbose)
    flags: dict[str, object] = {**o.run_flags(params), "num_clients": min_clients}
    from ..deploy.coordinator import ServerOptions, check_run_dir, start_server
    from ..config.names import BUILTIN_TASKS

    with errors_to_exit():
        _refuse_simulation_only(partition)
        if resume is not None:
            o.check_resume_or_force(resume, force)
            cfg, done = _resume_config(resume, config, flags)
        else:
            cfg, done = _with_default_norm(build_config(config, flags)), 0
            if cfg.task not in BUILTIN_TASKS:  # a built-in needs no check (nor torch in this process)
                from ..tasks import get_task

                get_task(cfg.task)  # an unknown task fails here, before any process starts
            cfg = cfg.replace(out=check_run_dir(cfg.out, force=force))
        options = ServerOptions(keys=keys, fleet_address=address, control_port=control_port, insecure=insecure)
    _warn_server(cfg, insecure)
    _warn_key_dir(keys)
    with sigterm_as_interrupt():
        server = None
        try:
            with errors_to_exit():
                server = start_server(options, home=cfg.out / "superlink")
            _serve(server, cfg, options, resume=done > 0)
        except KeyboardInterrupt:
            console.print("interrupted: stopping ...")
            raise typer.Exit(130) from None
        finally:
            if server is not None:
                server.close()


def _refuse_simulation_only(partition: str | None) -> None:
    """``--partition`` splits one dataset among virtual clients; deployed sites each bring their own data, so the
    flag could only be ignored, and an ignored setting reads as if it took effect."""
    if partition is not None:
        from ..errors import ConfigError

        raise ConfigError("--partition splits one dataset among simulated clients; in a deployment each site brings "
                          "its own data (fedshield client --data): drop --partition")


def _resume_config(run_dir: Path, config_file: Path | None, flags: dict[str, object]) -> tuple[RunConfig, int]:
    """The run's own settings and completed rounds; settings flags are refused (they would change the mechanism
    under the clients' ledgers)."""
    from ..errors import ConfigError
    from ..deploy.coordinator import load_resume

    given = sorted(k.replace("_", "-") for k, v in flags.items() if v is not None)
    if given or config_file is not None:
        raise ConfigError(
            f"--resume continues a run with its original settings; drop {', '.join(given) or '--config'} "
            "(start a new run with --out to change settings)"
        )
    cfg, done = load_resume(run_dir)
    console.print(f"resuming {cfg.out} after round {done} of {cfg.num_rounds}")
    return cfg, done


def _with_default_norm(cfg: RunConfig) -> RunConfig:
    """Without SecAgg+ the server sees each update: bound its norm unless the operator chose a bound."""
    if cfg.secagg or cfg.max_update_norm is not None:
        return cfg
    return cfg.replace(max_update_norm=DEFAULT_MAX_UPDATE_NORM)


def _warn_key_dir(keys: Path | None) -> None:
    """The server needs server.key only: the CA key and the sites' keys beside it are one break-in from a forged
    server certificate or an impersonated site."""
    if keys is None or not Path(keys).is_dir():
        return
    extra = sorted(p.name for p in Path(keys).iterdir() if p.suffix == ".key" and p.name != "server.key")
    if extra:
        console.print(f"[bold yellow]WARNING[/]: {escape(str(keys))} holds private keys this server does not need: "
                      f"{escape(', '.join(extra))}. Move ca.key offline and give each node-N.key to its site only, "
                      "then delete them here (the server needs ca.pem, server.pem, server.key and "
                      "authorized-nodes.txt).")


def _warn_server(cfg: RunConfig, insecure: bool) -> None:
    if insecure:
        console.print("[bold red]WARNING[/]: --insecure: NO TLS and NO node authentication. Anyone who reaches the "
                      "port can join, read the model and send updates. Local experiments only.")
    if not cfg.dp:
        console.print("[bold red]WARNING[/]: --no-dp: clients train WITHOUT differential privacy; updates can reveal "
                      "individual records.")
    if not cfg.secagg:
        console.print("[bold yellow]WARNING[/]: --no-secagg: the server sees every client's update in clear; clients "
                      "refuse to train unless started with --allow-plain-updates. Updates with an L2 norm above "
                      f"{cfg.max_update_norm:g} are rejected (--max-update-norm).")


def _serve(server: FedshieldServer, cfg: RunConfig, options: ServerOptions, *, resume: bool = False) -> None:
    from ..deploy.coordinator import read_summary

    names = ", ".join(server.registered) or "none (insecure: any node may join)"
    console.print(
        f"fedshield server: Fleet API on {options.fleet_address} ({'INSECURE' if options.insecure else 'TLS + node auth'})"
        f", registered nodes: {names}"
    )
    with errors_to_exit():
        run_id = server.submit(cfg, resume=resume)
    console.print(
        f"run {run_id}: task={cfg.task} rounds={cfg.num_rounds} min-clients={cfg.num_clients} "
        f"dp={'on' if cfg.dp else 'OFF'} secagg={'on' if cfg.secagg else 'OFF'} out={cfg.out}"
    )
    started = time.monotonic()
    try:
        result = server.follow(run_id, cfg, on_round=_print_round, on_nodes=lambda n: _print_nodes(n, cfg))
    except FedshieldError as exc:  # the SuperLink died or stopped answering mid-run: not bad input
        server.stop_run(run_id)
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        console.print(f"interrupted: stopping run {run_id} ...")
        server.stop_run(run_id)
        raise
    console.print(f"run {run_id} {result.status} in {time.monotonic() - started:.1f} s")
    if not result.completed:
        tail = "\n".join(result.log.strip().splitlines()[-_LOG_TAIL_LINES:])
        console.print(escape(tail))
        typer.echo(f"error: run {run_id} {result.status}: {result.details or 'see the log above'}", err=True)
        raise typer.Exit(1)
    summary = read_summary(cfg)
    print_summary(summary, console)
    _print_failures(summary.privacy)


def _print_failures(privacy: dict[str, object]) -> None:
    """Who did not contribute and why (a refusal's reason names its fix), so the operator need not open files."""
    clients = privacy.get("clients", {})
    for name, entry in clients.items() if isinstance(clients, dict) else ():
        for failure in entry.get("failures", []) if isinstance(entry, dict) else ():
            console.print(f"[yellow]{escape(printable(str(name)))} did not contribute in round "
                          f"{escape(printable(str(failure.get('round'))))}[/]: "
                          f"{escape(printable(str(failure.get('reason', ''))))}")


def _print_round(record: RoundRecord) -> None:
    console.print(round_line(record))


def _print_nodes(online: int, cfg: RunConfig) -> None:
    need = cfg.num_clients
    state = "starting" if online >= need else f"waiting for clients (at most {cfg.node_wait_timeout:g} s)"
    console.print(f"{online}/{need} clients online: {state}")
