"""The ``fedshield`` command: the only place that configures logging, prints for humans or exits the process.

Every :class:`~fedshield.errors.FedshieldError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import typer

from .simulate import simulate_command

__all__ = ["main", "cli"]

cli = typer.Typer(
    name="fedshield",
    help="Private federated learning: Flower + Opacus DP-SGD, secure aggregation, TLS and node authentication.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
cli.command("simulate")(simulate_command)


def _register_optional() -> None:
    # Sub-commands live in their own modules; each is registered only if present in this install.
    try:
        from .keys import keys_app
    except ImportError:
        return
    cli.add_typer(keys_app, name="keys", help="Make and manage the CA, server certificate and node keys.")
    from .client import client_command
    from .server import server_command

    cli.command("server")(server_command)
    cli.command("client")(client_command)


_register_optional()


def main() -> None:
    try:
        cli()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
