"""``fedshield server`` and ``fedshield client``: a real federation of processes, one server and one client per site.

Exit codes: 0 the run completed (server) or the client was stopped with Ctrl-C after serving; 1 the run failed or
the client's SuperNode died; 2 bad input (flags, keys, data, ports, an unreachable or refusing server), always as
one line ``error: ...``; 130 interrupted (Ctrl-C or SIGTERM; the run is stopped and every process we started is
stopped by PID).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from ..config import RunConfig
from ..errors import FedshieldError
from ..server.runner import RoundRecord
from . import _options as o
from ._common import configure_logging, errors_to_exit, fail, printable
from ._report import print_summary, round_line
from .simulate import build_config

if TYPE_CHECKING:
    from ..client.deployment import ClientCheck, ClientOptions, FedshieldClient
    from ..server.deployment import FedshieldServer, ServerOptions

__all__ = ["client_command", "server_command"]

# soft_wrap: a server or client runs for hours with its output in a log file; never break lines at 80 columns.
console = Console(stderr=False, highlight=False, soft_wrap=True)
_LOG_TAIL_LINES = 40
#: ``fedshield server --max-update-norm`` without SecAgg+ when none is given: honest digits updates at the default
#: settings measured 2.12-2.18 (3 clients x 3 rounds, DP eps 8); 10 leaves 4.6x headroom and rejects a 20x
#: scaled update. Other tasks: set --max-update-norm to a few times the norms their honest rounds report.
DEFAULT_MAX_UPDATE_NORM = 10.0


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, docker stop, kill) takes the same clean path as Ctrl-C: stop the run and our processes."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ------------------------------------------------------------------------------------------------ server


def server_command(
    keys: Path | None = typer.Option(None, "--keys", help="Key directory from `fedshield keys init` (TLS + node keys)."),
    address: str = typer.Option("0.0.0.0:9092", "--address", help="Fleet API HOST:PORT the sites connect to."),
    control_port: int = typer.Option(8000, "--control-port", help="Local Control API port (bound to 127.0.0.1 only)."),
    rounds: o.Rounds = None,
    min_clients: int | None = typer.Option(None, "--min-clients", help="Clients that must be online to train (default 5)."),
    out: o.Out = None,
    config: o.ConfigFile = None,
    task: o.Task = None,
    epsilon: o.Epsilon = None,
    delta: o.Delta = None,
    noise_multiplier: o.NoiseMultiplier = None,
    max_grad_norm: o.MaxGradNorm = None,
    sample_rate: o.SampleRate = None,
    lr: o.Lr = None,
    local_epochs: o.LocalEpochs = None,
    fraction_train: o.FractionTrain = None,
    fraction_evaluate: o.FractionEvaluate = None,
    accountant: o.Accountant = None,
    grad_sample_mode: o.GradSampleMode = None,
    no_dp: o.NoDp = False,
    no_secagg: o.NoSecagg = False,
    secagg_shares: o.SecaggShares = None,
    secagg_threshold: o.SecaggThreshold = None,
    seed: int | None = typer.Option(None, "--seed", help="Seed for the initial model (clients draw their own noise)."),
    device: str | None = typer.Option(None, "--device", help="Clients' default device: auto | cpu | cuda[:N] (a site's --device wins)."),
    max_physical_batch_size: o.MaxPhysicalBatchSize = None,
    amp: o.Amp = False,
    round_timeout: o.RoundTimeout = None,
    max_update_norm: float | None = typer.Option(
        None, "--max-update-norm",
        help=f"Reject updates whose L2 norm exceeds this (without SecAgg+ default {DEFAULT_MAX_UPDATE_NORM:g})."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS, no node authentication: local experiments ONLY."),
    resume: o.Resume = None,
    force: o.Force = False,
    verbose: o.Verbose = False,
) -> None:
    """Run a federated training with real clients: start the SuperLink, register the sites' keys, train, report."""
    params = dict(locals())
    configure_logging(verbose)
    flags: dict[str, object] = {
        **o.run_flags(params),
        "num_clients": min_clients, "max_update_norm": max_update_norm,
    }
    from ..server.deployment import ServerOptions, check_run_dir, start_server
    from ..tasks import get_task

    with errors_to_exit():
        if resume is not None:
            o.check_resume_or_force(resume, force)
            cfg, done = _resume_config(resume, config, flags)
        else:
            cfg, done = _with_default_norm(build_config(config, flags)), 0
            get_task(cfg.task)  # an unknown task fails here, before any process starts
            cfg = cfg.replace(out=check_run_dir(cfg.out, force=force))
        options = ServerOptions(keys=keys, fleet_address=address, control_port=control_port, insecure=insecure)
    _warn_server(cfg, insecure)
    _warn_key_dir(keys)
    with _sigterm_as_interrupt():
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


def _resume_config(run_dir: Path, config_file: Path | None, flags: dict[str, object]) -> tuple[RunConfig, int]:
    """The run's own settings and completed rounds; settings flags are refused (they would change the mechanism
    under the clients' ledgers)."""
    from ..errors import ConfigError
    from ..server.deployment import load_resume

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
    from ..server.deployment import read_summary

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
    state = "starting" if online >= need else "waiting for clients"
    console.print(f"{online}/{need} clients online: {state}")


# ------------------------------------------------------------------------------------------------ client


def client_command(
    server: str = typer.Option(..., "--server", help="HOST:PORT of the server's Fleet API (`fedshield server --address`)."),
    data: Path = typer.Option(..., "--data", help="This site's data: .csv, .parquet, .npz or an image folder."),
    state: Path = typer.Option(..., "--state", help="Directory for this site's privacy ledger and logs (keep it)."),
    ca: Path | None = typer.Option(None, "--ca", help="ca.pem from the server's `fedshield keys init`."),
    node_key: Path | None = typer.Option(None, "--node-key", help="This site's node-N.key (mode 0600)."),
    task: str | None = typer.Option(
        None, "--task", help="The only task this site runs (default digits); a round naming another is refused."
    ),
    label_column: str | None = typer.Option(None, "--label-column", help="Label column of a .csv/.parquet (default label)."),
    text_column: o.TextColumn = None,
    max_epsilon: float | None = typer.Option(
        None, "--max-epsilon", help="This site's lifetime privacy budget (default 10), at its own delta."
    ),
    delta: float | None = typer.Option(
        None, "--delta", help="This site's delta: its ledger accounts here; larger asks are refused (default: 1e-5, or the largest power of ten below 1/records)."
    ),
    accountant: str | None = typer.Option(None, "--accountant", help="This site's accountant: prv (default) | rdp."),
    allow_no_dp: bool = typer.Option(False, "--allow-no-dp", help="Also train when the server turns DP-SGD off."),
    policy: Path | None = typer.Option(
        None, "--policy", help="Site policy TOML (max-epsilon, delta, accountant, allow-no-dp, allow-plain-updates, task); flags win."
    ),
    device: str | None = typer.Option(
        None, "--device", help="Where this site trains: auto (CUDA if present) | cpu | cuda[:N]; default: the server's."
    ),
    allow_plain_updates: bool = typer.Option(
        False, "--allow-plain-updates", help="Also train when the server does not use secure aggregation."
    ),
    port: int | None = typer.Option(None, "--port", help="Local port of the SuperNode's runtime API (default: any free)."),
    connect_attempts: int = typer.Option(10, "--connect-attempts", help="Tries to reach the server before giving up."),
    retry_wait: float = typer.Option(2.0, "--retry-wait", help="Seconds before the 2nd try; doubles each time (max 60)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS, no node key: local experiments ONLY."),
    roster: Path | None = typer.Option(
        None, "--roster", help="authorized-nodes.txt from the coordinator (fingerprints checked with the other sites): "
        "SecAgg+ peers must sign their keys with one of these node keys."
    ),
    secagg_min_peers: int = typer.Option(2, "--secagg-min-peers", help="Fewest other signed SecAgg+ sites per round."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail."),
) -> None:
    """Join a federation: check keys and data, connect to the server, and train when it asks, until Ctrl-C."""
    configure_logging(verbose)
    from ..client.deployment import ClientOptions, check_client, start_client

    from ..client.policy import load_policy_file

    with errors_to_exit():
        site = load_policy_file(policy) if policy is not None else {}
        options = ClientOptions(
            server=server, data=data, state_dir=state, ca_cert=ca, node_key=node_key,
            task=str(task or site.get("task", "digits")), label_column=label_column, text_column=text_column,
            max_epsilon=max_epsilon if max_epsilon is not None else site.get("max_epsilon"), device=device,
            allow_plain_updates=allow_plain_updates or site.get("allow_plain_updates") is True,
            delta=delta if delta is not None else site.get("delta"),
            accountant=str(accountant or site.get("accountant", "prv")),
            allow_no_dp=allow_no_dp or site.get("allow_no_dp") is True,
            insecure=insecure, port=port, connect_attempts=connect_attempts, retry_wait=retry_wait,
            roster=roster, secagg_min_peers=secagg_min_peers,
        )
        check = check_client(options)
    _report_check(check, options)
    with _sigterm_as_interrupt():
        client = None
        try:
            with errors_to_exit():
                client = start_client(options, check=check, on_retry=_print_retry)
            console.print(f"connected to {server} as node {client.node_id}; waiting for the server's rounds "
                          f"(Ctrl-C to stop). SuperNode log: {client.log_path}")
            _serve_client(client)
        except KeyboardInterrupt:
            console.print("interrupted: stopping the SuperNode ...")
            raise typer.Exit(130) from None
        finally:
            if client is not None:
                client.stop()


def _report_check(check: ClientCheck, options: ClientOptions) -> None:
    if options.insecure:
        console.print("[bold red]WARNING[/]: --insecure: NO TLS and NO node key; local experiments only.")
    if options.allow_plain_updates:
        console.print("[bold yellow]WARNING[/]: --allow-plain-updates: when the server asks, this site sends its "
                      "update unmasked and the server sees it in clear.")
    if options.allow_no_dp:
        console.print("[bold yellow]WARNING[/]: --allow-no-dp: when the server asks, this site trains WITHOUT "
                      "differential privacy and its update carries no guarantee.")
    if check.policy is not None:
        p = check.policy
        console.print(f"site policy: task {p.task}, max epsilon {p.max_epsilon:g} at delta {p.delta:g} ({p.accountant}), "
                      f"DP {'optional' if p.allow_no_dp else 'required'}, SecAgg+ "
                      f"{'optional' if options.allow_plain_updates else 'required'}")
    for warning in check.warnings:
        console.print(f"[bold yellow]WARNING[/]: {escape(warning)}")
    spent = "none yet" if check.ledger is None else f"epsilon {check.ledger.epsilon:.3f}"
    console.print(f"data ok: {check.train_examples} training + {check.test_examples} test examples "
                  f"({options.task}) on {check.device}; privacy spent so far: {spent}")


def _print_retry(attempt: int, attempts: int, wait: float, reason: str) -> None:
    console.print(f"not connected yet ({reason}); attempt {attempt}/{attempts}, next in {wait:.0f} s")


def _serve_client(client: FedshieldClient) -> None:
    """Until the SuperNode exits: report each training round as this site's ledger records it."""
    last = _ledger_rounds(client)
    while client.is_running():
        time.sleep(1.0)
        rounds = _ledger_rounds(client)
        ledger = client.ledger() if rounds > last else None
        if ledger is not None:
            console.print(f"charged a DP round: epsilon spent {ledger.epsilon:.3f} over {len(ledger.rounds)} rounds")
            last = rounds
    fail(str(client.failure()), code=1)


def _ledger_rounds(client: FedshieldClient) -> int:
    try:
        ledger = client.ledger()
    except (FedshieldError, OSError):  # unreadable right now; the ClientApp would fail loudly on it itself
        return -1
    return 0 if ledger is None else len(ledger.rounds)
