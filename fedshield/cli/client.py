"""``fedshield client``: one site of a real federation, a SuperNode that trains on this site's data when the
server asks, under this site's own privacy policy.

Exit codes: 1 the client's SuperNode died; 2 bad input (flags, keys, data, ports, an unreachable or refusing
server), always as one line ``error: ...``; 130 interrupted (Ctrl-C or SIGTERM; the SuperNode is stopped by PID).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import FedshieldError
from . import _options as o
from ._common import configure_logging, errors_to_exit, fail, sigterm_as_interrupt

if TYPE_CHECKING:
    from ..deploy.site import ClientCheck, ClientOptions, FedshieldClient

__all__ = ["client_command"]

# soft_wrap: a client runs for hours with its output in a log file; never break lines at 80 columns.
console = Console(stderr=False, highlight=False, soft_wrap=True)


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
    min_honest: int = typer.Option(0, "--min-honest", help="Distributed DP: the most sites this site relies on to add "
                                   "their noise share; rounds assuming more (smaller shares each) are refused (0: any)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail."),
) -> None:
    """Join a federation: check keys and data, connect to the server, and train when it asks, until Ctrl-C."""
    configure_logging(verbose)
    from ..deploy.site import ClientOptions, check_client, start_client

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
            roster=roster, secagg_min_peers=secagg_min_peers, min_honest=min_honest,
        )
        check = check_client(options)
    _report_check(check, options)
    with sigterm_as_interrupt():
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
