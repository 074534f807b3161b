"""Start, use and stop a Flower 1.39 SuperLink (Fleet API over gRPC-rere, TLS, SuperNode authentication).

The command line this builds (every flag checked against ``flwr/superlink/cli/flower_superlink.py`` of 1.39)::

    python -m fedshield.deploy.superlink_main --fleet-api-type grpc-rere --fleet-api-address 0.0.0.0:9092 \\
        --host 127.0.0.1 --port 8000 \\                      # Control + Runtime HTTP API (one port on 1.39)
        --ssl-ca-certfile ca.pem --ssl-certfile server.pem --ssl-keyfile server.key \\
        --enable-supernode-auth --database state.db \\
        --disable-runtime-dependency-installation --isolation subprocess

(``fedshield.deploy.superlink_main`` is ``flower-superlink`` whose HTTP API refuses other local users.)
``--enable-supernode-auth`` needs TLS and grpc-rere (Flower exits otherwise). Nodes are then admitted only after
``flwr supernode register KEY.pub CONNECTION`` (:meth:`SuperLink.register_node`); registrations survive a restart
only with ``--database``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedshield.atomic import atomic_write_text
from fedshield.crypto import KeySet
from fedshield.deploy.connection import FlwrConnection
from fedshield.errors import DeploymentError
from fedshield.flower_internals.logs import ALREADY_REGISTERED
from fedshield.deploy.process import (
    FlowerProcess,
    ensure_ports_free,
    flower_env,
    parse_address,
)

__all__ = ["ServerTls", "StoredNode", "SuperLink", "SuperLinkConfig", "start_superlink"]

Isolation = Literal["subprocess", "process"]
_ALREADY_REGISTERED = ALREADY_REGISTERED
_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
_REGISTER_TIMEOUT_S = 240.0
#: Seconds between the SuperLink's SuperExec's checks for a ServerApp to start (an operator's own value wins).
SUPERLINK_SUPEREXEC_POLL_S = "0.5"


@dataclass(frozen=True)
class ServerTls:
    """The SuperLink's certificate files; one set covers the Fleet, Control and Runtime APIs on 1.39."""

    ca_cert: Path
    certfile: Path
    keyfile: Path

    @classmethod
    def from_keyset(cls, keyset: KeySet) -> ServerTls:
        return cls(ca_cert=keyset.ca_cert, certfile=keyset.server_cert, keyfile=keyset.server_key)


@dataclass(frozen=True)
class SuperLinkConfig:
    """Everything one SuperLink process needs; ``run_dir`` receives its log, state database and ``FLWR_HOME``.

    ``tls=None`` is refused unless ``insecure=True``, and node authentication cannot be combined with insecure
    mode. ``control_host`` stays on loopback by default: the Control API accepts runs from anyone who can reach it
    (there is no account login without Flower's enterprise plugins), so expose it only on purpose.
    """

    run_dir: Path
    fleet_address: str = "0.0.0.0:9092"
    control_host: str = "127.0.0.1"
    control_port: int = 8000
    tls: ServerTls | None = None
    insecure: bool = False
    node_auth: bool = True
    database: Path | None = None
    isolation: Isolation = "subprocess"
    runtime_dependency_installation: bool = False
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        parse_address(self.fleet_address)
        if (self.tls is None) != self.insecure:
            raise DeploymentError(
                "A SuperLink needs TLS files (ServerTls, from `fedshield keys init`) or insecure=True, not both "
                f"and not neither; got tls={self.tls}, insecure={self.insecure}."
            )
        if self.node_auth and self.insecure:
            raise DeploymentError(
                "SuperNode authentication needs TLS (Flower exits with code 104 otherwise); "
                "pass the TLS files from `fedshield keys init`, or turn node_auth off for a local test."
            )
        if self.isolation not in ("subprocess", "process"):
            raise DeploymentError(f"isolation must be 'subprocess' or 'process', got {self.isolation!r}.")

    @property
    def database_path(self) -> Path:
        return self.database if self.database is not None else Path(self.run_dir) / "superlink-state.db"

    @property
    def control_address(self) -> str:
        host = f"[{self.control_host}]" if ":" in self.control_host else self.control_host
        return f"{host}:{self.control_port}"

    def argv(self) -> list[str]:
        """The ``flower-superlink`` command line (absolute paths: Flower passes them on to its SuperExec).

        It runs through :mod:`fedshield.deploy.superlink_main`, which admits only this user's processes to the
        Control and Runtime API (Flower checks no caller there).
        """
        argv = [
            sys.executable, "-m", "fedshield.deploy.superlink_main",
            "--fleet-api-type", "grpc-rere",
            "--fleet-api-address", self.fleet_address,
            "--host", self.control_host,
            "--port", str(self.control_port),
            "--database", str(Path(self.database_path).resolve()),
            "--isolation", self.isolation,
        ]  # fmt: skip
        if self.tls is None:
            argv.append("--insecure")
        else:
            argv += ["--ssl-ca-certfile", str(Path(self.tls.ca_cert).resolve())]
            argv += ["--ssl-certfile", str(Path(self.tls.certfile).resolve())]
            argv += ["--ssl-keyfile", str(Path(self.tls.keyfile).resolve())]
        if self.node_auth:
            argv.append("--enable-supernode-auth")
        if not self.runtime_dependency_installation:
            # Without this, every `flwr run` would `uv sync` the app's dependencies (a CUDA torch is 6 GB).
            argv.append("--disable-runtime-dependency-installation")
        return argv

    def endpoints(self) -> list[tuple[str, int]]:
        return [parse_address(self.fleet_address), (self.control_host, self.control_port)]


@dataclass(frozen=True)
class StoredNode:
    """A node as the SuperLink's database holds it: ID, status and public key (PEM, SubjectPublicKeyInfo)."""

    node_id: int
    status: str
    public_key_pem: str


class SuperLink:
    """A running SuperLink and the ``flwr`` connection that reaches its Control API."""

    def __init__(self, config: SuperLinkConfig, process: FlowerProcess, connection: FlwrConnection) -> None:
        self.config = config
        self.process = process
        self.connection = connection

    @property
    def fleet_address(self) -> str:
        """Address SuperNodes on this machine dial (a bind-all host becomes 127.0.0.1)."""
        return _dial_address(*parse_address(self.config.fleet_address))

    def register_node(self, public_key: str | Path, *, name: str) -> int | None:
        """Admit a SuperNode's public key (OpenSSH line or ``.pub`` file); returns its node ID.

        Registering a key the SuperLink already knows is not an error (``None`` is returned): with ``--database``
        registrations survive restarts, so ``fedshield server`` re-registers the whole list on every start.
        Asked through the Control API in this process (``flower_internals.control``); through ``flwr supernode
        register`` (a process importing Flower's CLI, ~1.5 s of CPU) only if Flower's modules moved.
        """
        key_file = _public_key_file(self.config.run_dir, public_key, name)
        try:
            from fedshield.flower_internals.control import register_node

            return self._control(f"Registering node {name!r} ({key_file})", register_node,
                                 public_key_file=key_file, name=name)
        except ImportError:
            pass
        args = ["supernode", "register", str(key_file), self.connection.name, "--name", name]
        reply, error = self.connection.try_json(args, timeout=_REGISTER_TIMEOUT_S)
        if reply is not None:
            return int(reply["node-id"])
        if _ALREADY_REGISTERED in error:
            return None
        raise DeploymentError(f"Registering node {name!r} ({key_file}) on {self.connection.address} failed: {error}")

    def unregister_node(self, node_id: int) -> None:
        """Revoke a stored node: Flower marks it unregistered and refuses its key from then on."""
        try:
            from fedshield.flower_internals.control import unregister_node
        except ImportError:
            self.connection.run_json(["supernode", "unregister", str(int(node_id)), self.connection.name])
            return
        self._control(f"Unregistering node {node_id}", unregister_node, node_id=int(node_id))

    def stored_nodes(self) -> list[StoredNode]:
        """Every node in the SuperLink's database with its public key (``flwr supernode list`` omits the key)."""
        from fedshield.flower_internals.control import list_nodes

        nodes = self._control("Listing the SuperLink's nodes", list_nodes)
        return [StoredNode(int(n["node-id"]), str(n["status"]), str(n["public-key"])) for n in nodes]

    def list_nodes(self) -> list[dict[str, Any]]:
        """What ``flwr supernode list --format json`` lists: node IDs and status (``registered``, ``online``,
        ``offline``), asked in this process; through the command only if Flower's modules moved."""
        try:
            from fedshield.flower_internals.control import list_nodes
        except ImportError:
            nodes = self.connection.run_json(["supernode", "list", self.connection.name]).get("nodes", [])
            return [n for n in nodes if isinstance(n, dict)]
        return self._control("Listing the SuperLink's nodes", list_nodes)

    def _control(self, what: str, call: Any, **kwargs: Any) -> Any:
        """``call(address, root_certificates=..., **kwargs)``; an HTTP or key failure becomes one line."""
        try:
            return call(self.connection.address, root_certificates=self.connection.root_certificates, **kwargs)
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001  httpx / protobuf / key errors: one line, as the CLI gave
            detail = " ".join(str(err).split()[:20]) or type(err).__name__
            raise DeploymentError(f"{what} on {self.connection.address} failed: {detail}; is the SuperLink up?") from err

    def stop(self, *, grace: float = 10.0) -> int | None:
        return self.process.stop(grace=grace)

    def __enter__(self) -> SuperLink:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_superlink(config: SuperLinkConfig, *, timeout: float = 60.0, connection_name: str = "fedshield") -> SuperLink:
    """Start ``flower-superlink`` and return once its Fleet and Control ports accept connections.

    Raises :class:`~fedshield.errors.PortInUseError` before starting if a port is taken, and
    :class:`~fedshield.errors.DeploymentError` with the tail of its log if it exits or does not listen
    within ``timeout`` seconds.
    """
    run_dir = Path(config.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    fleet_port = parse_address(config.fleet_address)[1]
    ensure_ports_free(
        config.endpoints(), flag_hints={fleet_port: "--fleet-port", config.control_port: "--control-port"}
    )
    env_extra = dict(config.extra_env)
    if _POLL_ENV not in os.environ:
        # Its SuperExec starts only a ServerApp per run: polling for one every 0.1 s (fedshield's SuperNode value)
        # cost ~16% of the SuperLink's CPU during rounds; 0.5 s adds at most that to the start of a run.
        env_extra.setdefault(_POLL_ENV, SUPERLINK_SUPEREXEC_POLL_S)
    if not config.runtime_dependency_installation:
        env_extra.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    process = FlowerProcess(
        "flower-superlink",
        config.argv(),
        log_path=run_dir / "superlink.log",
        env=flower_env(run_dir / "flwr-home", extra=env_extra),
        cwd=run_dir,
    )
    try:
        process.wait_for_ports(config.endpoints(), timeout=timeout)
    except BaseException:
        process.stop(grace=2.0)
        raise
    connection = FlwrConnection(
        name=connection_name,
        address=_dial_address(config.control_host, config.control_port),
        flwr_home=run_dir / "flwr-cli",
        root_certificates=None if config.tls is None else Path(config.tls.ca_cert).resolve(),
        insecure=config.tls is None,
    )
    connection.write_config()
    return SuperLink(config, process, connection)


def _dial_address(host: str, port: int) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _public_key_file(run_dir: Path, public_key: str | Path, name: str) -> Path:
    """``flwr supernode register`` takes a file: write an OpenSSH line given as text into ``run_dir``."""
    if isinstance(public_key, Path):
        return public_key.resolve()
    path = Path(run_dir).resolve() / "registered-keys" / f"{name}.pub"
    atomic_write_text(path, public_key.strip() + "\n")
    return path
