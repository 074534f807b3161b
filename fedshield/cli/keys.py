"""``fedshield keys``: make and extend a federation's TLS certificates and SuperNode keys.

Registered into the main CLI as ``fedshield keys``. Only this layer prints; library errors become one line on
stderr and exit code 2 (``_common.run_guarded``).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from ..crypto import KeySet, add_node, add_site_public_key, init_keys, make_site_key, remove_node
from ..crypto.secagg_auth import load_roster
from ..errors import KeyMaterialError
from ._common import run_guarded

__all__ = ["keys_app"]

keys_app = typer.Typer(
    name="keys",
    help="Create TLS certificates and SuperNode authentication keys.",
    no_args_is_help=True,
    add_completion=False,
)


@keys_app.command("init")
def init_command(
    out: Annotated[Path, typer.Option("--out", help="Directory for the new key material.")],
    server_host: Annotated[
        list[str],
        typer.Option(
            "--server-host",
            help="Name or IP address SuperNodes dial to reach the SuperLink; comma-separated or repeated.",
        ),
    ],
    nodes: Annotated[int, typer.Option("--nodes", min=0, help="Number of SuperNode key pairs to create.")] = 2,
    force: Annotated[bool, typer.Option("--force", help="Replace existing key material in --out.")] = False,
) -> None:
    """Create a CA, a SuperLink certificate and one key pair per SuperNode."""
    hosts = [h.strip() for value in server_host for h in value.split(",") if h.strip()]
    keyset = run_guarded(lambda: init_keys(out, server_hosts=hosts, nodes=nodes, force=force))
    _print_summary(keyset)


@keys_app.command("add-node")
def add_node_command(
    keys: Annotated[Path, typer.Option("--keys", help="Key directory made by `fedshield keys init`.")],
    name: Annotated[str | None, typer.Option("--name", help="Node name (default: the next node-N).")] = None,
    public_key: Annotated[
        Path | None,
        typer.Option("--public-key", help="A site's own .pub (from `fedshield keys site-key`): authorize it, make no key."),
    ] = None,
    server_out: Annotated[Path, typer.Option(
        "--server-out", help="The running `fedshield server`'s --out: register the key with it now.")] = Path("runs/latest"),
) -> None:
    """Authorize one more SuperNode: a new key pair (or the site's own .pub), appended to authorized-nodes.txt and
    registered with the running server when there is one."""
    if public_key is not None:
        line = run_guarded(lambda: _read_pub(public_key))
        pub_path = run_guarded(lambda: add_site_public_key(keys, name=name, public_key=line))
        typer.echo(f"Authorized {pub_path.stem}: wrote {pub_path}, added to {keys / 'authorized-nodes.txt'}.")
        typer.echo("Send the updated authorized-nodes.txt to every site as its SecAgg+ roster (--roster); the sites")
        typer.echo("compare its fingerprints (`fedshield keys fingerprints`) with each other out of band.")
        typer.echo(_register_now(pub_path.resolve(), pub_path.stem, Path(server_out)))
        return
    key_path = run_guarded(lambda: add_node(keys, name=name))
    node = key_path.stem
    typer.echo(f"Created {key_path} and {key_path.with_suffix('.pub')}; added to {keys / 'authorized-nodes.txt'}.")
    typer.echo(f"Give {key_path.name} and ca.pem to the new site only.")
    typer.echo(_register_now(key_path.with_suffix(".pub").resolve(), node, Path(server_out)))


@keys_app.command("remove-node")
def remove_node_command(
    name: Annotated[str, typer.Argument(help="The node to revoke, as named in authorized-nodes.txt (e.g. node-3).")],
    keys: Annotated[Path, typer.Option("--keys", help="Key directory made by `fedshield keys init`.")],
) -> None:
    """Revoke a SuperNode: its entry leaves authorized-nodes.txt and its key files are deleted; `fedshield server`
    unregisters it from the SuperLink's database at its next start."""
    deleted = run_guarded(lambda: remove_node(keys, name))
    gone = f" and deleted {', '.join(str(p) for p in deleted)}" if deleted else ""
    typer.echo(f"Removed {name} from {keys / 'authorized-nodes.txt'}{gone}.")
    typer.echo("Restart `fedshield server`: at every start it unregisters each stored node that "
               "authorized-nodes.txt no longer lists, so this key cannot connect again.")


def _register_now(pub: Path, name: str, server_out: Path) -> str:
    """Register with the server whose run directory is ``server_out`` if it runs; else say what will."""
    from ..deploy.connection import read_connection
    from ..deploy.process import flower_executable

    home = server_out.expanduser().resolve() / "superlink" / "flwr-cli"
    connection = read_connection(home)
    if connection is None:
        return (f"No running server found under {server_out} (--server-out): `fedshield server` registers every key "
                "in authorized-nodes.txt when it starts.")
    reply, error = connection.try_json(["supernode", "register", str(pub), connection.name, "--name", name])
    if reply is not None:
        return f"Registered {name} with the server at {connection.address} as node {reply.get('node-id')}."
    flwr = shlex.quote(flower_executable("flwr"))
    command = (f"cd {shlex.quote(str(home))} && FLWR_HOME={shlex.quote(str(home))} {flwr} supernode register "
               f"{shlex.quote(str(pub))} {shlex.quote(connection.name)} --name {shlex.quote(name)}")
    return (f"Could not register {name} with the server at {connection.address} ({error}). With that server "
            f"running, this one command registers it: {command}")


@keys_app.command("site-key")
def site_key_command(
    out: Annotated[Path, typer.Option("--out", help="Directory on THIS site's machine for its key pair.")],
    name: Annotated[str, typer.Option("--name", help="This site's name, e.g. hospital-a.")],
) -> None:
    """Make this site's own node key on its own machine; only the .pub goes to the coordinator."""
    pub_path, print_ = run_guarded(lambda: make_site_key(out, name=name))
    typer.echo(f"Created {pub_path.with_suffix('.key')} (keep it on this machine, mode 0600) and {pub_path}.")
    typer.echo(f"Fingerprint: {print_}")
    typer.echo(f"Send {pub_path.name} to the coordinator (`fedshield keys add-node --public-key {pub_path.name}`) and")
    typer.echo("read this fingerprint to the other sites over a channel the coordinator does not control.")


@keys_app.command("fingerprints")
def fingerprints_command(
    roster: Annotated[Path, typer.Option("--roster", help="authorized-nodes.txt (or any file of .pub lines).")],
) -> None:
    """Print each roster key's SHA256 fingerprint, to compare between sites out of band."""
    loaded = run_guarded(lambda: load_roster(roster))
    for entry in loaded.entries.values():
        typer.echo(f"{entry.fingerprint}  {entry.name}")


def _read_pub(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as err:
        raise KeyMaterialError(f"cannot read --public-key {path} ({err.strerror}): pass the site's .pub file") from err


def _print_summary(keyset: KeySet) -> None:
    typer.echo(f"Key material in {keyset.directory}:")
    typer.echo(f"  {keyset.ca_cert.name:<22} CA certificate: give a copy to every site")
    typer.echo(f"  {keyset.server_cert.name:<22} SuperLink certificate for {', '.join(keyset.server_hosts)}")
    typer.echo(f"  {keyset.server_key.name:<22} SuperLink private key (stays on the server)")
    typer.echo(f"  {'ca.key':<22} CA private key: move it offline; needed only to re-issue server.pem")
    for node in keyset.nodes:
        typer.echo(f"  {node.name + '.key':<22} private key for site {node.name} only")
    typer.echo(f"  {keyset.authorized_nodes.name:<22} public keys the SuperLink registers; every site's SecAgg+ roster")
    typer.echo("These node keys were made here, so this machine could sign as any site: for tests and demos. In")
    typer.echo("production each site runs `fedshield keys site-key` and sends only its .pub (`keys add-node --public-key`).")
