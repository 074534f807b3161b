"""Start and stop a Flower 1.39 SuperNode that dials a SuperLink with TLS and its node key.

The command line this builds (flags from ``flwr/supernode/cli/flower_supernode.py`` of 1.39)::

    python -m fedshield.deploy.supernode_main --superlink HOST:FLEETPORT --root-certificates ca.pem \\
        --auth-supernode-private-key node-1.key --node-config node-config.toml \\
        --host 127.0.0.1 --port 9094 --isolation subprocess

(``fedshield.deploy.supernode_main`` is ``flower-supernode`` with its idle poll shortened from 3 s.)
``--host/--port`` is the SuperNode's local Runtime HTTP API (where its ``flwr-clientapp`` processes fetch work), so
every SuperNode on one machine needs its own port. How Flower 1.39 reports a refused node (all exit status 1, the
reason only in the log): an unregistered key logs ``[code: 2004] Failed to activate SuperNode`` and ``Exit Code:
305``; a CA that did not sign the SuperLink's certificate logs ``CERTIFICATE_VERIFY_FAILED``; a plaintext node
against a TLS SuperLink retries forever unless ``max_retries``/``max_wait_time`` is set, then exits with 305.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fedshield.deploy.connection import TomlValue, write_flat_toml
from fedshield.errors import DeploymentError
from fedshield.flower_internals import logs
from fedshield.deploy.process import (
    FlowerProcess,
    ensure_ports_free,
    flower_env,
    parse_address,
)

__all__ = ["SuperNodeConfig", "SuperNode", "start_supernode", "explain_supernode_failure"]

_CONNECTED = logs.SUPERNODE_CONNECTED


@dataclass(frozen=True)
class SuperNodeConfig:
    """One SuperNode process; ``run_dir`` receives its log, node-config file and a private ``FLWR_HOME``.

    ``node_config`` reaches the ClientApp as ``context.node_config`` (e.g. ``{"data-path": "/data/site1.csv"}``).
    """

    run_dir: Path
    superlink: str
    root_certificates: Path | None = None
    private_key: Path | None = None
    insecure: bool = False
    node_config: Mapping[str, TomlValue] = field(default_factory=dict)
    runtime_host: str = "127.0.0.1"
    runtime_port: int = 9094
    isolation: Literal["subprocess", "process"] = "subprocess"
    max_retries: int | None = None
    max_wait_time: float | None = None
    name: str = "supernode"
    extra_env: Mapping[str, str] = field(default_factory=dict)
    #: Run only the site's installed fedshield ClientApp, never code from the run's app bundle
    #: (:mod:`fedshield.deploy.site_clientapp`). Off only for generic Flower apps in our own tests.
    site_code_only: bool = True

    def __post_init__(self) -> None:
        parse_address(self.superlink)
        if (self.root_certificates is None) != self.insecure:
            raise DeploymentError(
                f"SuperNode {self.name!r} needs the CA certificate that signed the SuperLink's certificate "
                "(root_certificates, the ca.pem from `fedshield keys init`) or insecure=True for a local test; "
                f"got root_certificates={self.root_certificates}, insecure={self.insecure}."
            )
        if self.insecure and self.private_key is not None:
            raise DeploymentError(
                f"SuperNode {self.name!r}: node authentication needs TLS (Flower exits otherwise); "
                "pass root_certificates, or drop private_key."
            )

    def argv(self, node_config_file: Path | None) -> list[str]:
        # Flower's SuperNode through our launcher, which only shortens its hard-coded 3 s idle poll.
        argv = [
            sys.executable, "-m", "fedshield.deploy.supernode_main",
            "--superlink", self.superlink,
            "--host", self.runtime_host,
            "--port", str(self.runtime_port),
            "--isolation", self.isolation,
        ]  # fmt: skip
        if self.root_certificates is not None:
            argv += ["--root-certificates", str(Path(self.root_certificates).resolve())]
        else:
            argv.append("--insecure")
        if self.private_key is not None:
            argv += ["--auth-supernode-private-key", str(Path(self.private_key).resolve())]
        if node_config_file is not None:
            argv += ["--node-config", str(node_config_file)]
        if not self.site_code_only:
            argv.append("--fedshield-any-app")
        if self.max_retries is not None:
            argv += ["--max-retries", str(self.max_retries)]
        if self.max_wait_time is not None:
            argv += ["--max-wait-time", str(self.max_wait_time)]
        return argv


class SuperNode:
    """A running (or refused) SuperNode; ``node_id`` is set once the SuperLink accepted it."""

    def __init__(self, config: SuperNodeConfig, process: FlowerProcess, node_id: int | None) -> None:
        self.config = config
        self.process = process
        self.node_id = node_id

    def wait_connected(self, *, timeout: float = 60.0) -> int:
        """Wait until the SuperLink accepted this node; a refusal raises with the reason and the fix."""
        try:
            match = self.process.wait_for_log(_CONNECTED, timeout=timeout)
        except DeploymentError as err:
            reason = explain_supernode_failure(self.process.log_text())
            raise DeploymentError(f"SuperNode {self.config.name!r} did not connect: {reason}\n{err}") from err
        self.node_id = int(match.group(1))
        return self.node_id

    def stop(self, *, grace: float = 10.0) -> int | None:
        return self.process.stop(grace=grace)

    def __enter__(self) -> SuperNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_supernode(config: SuperNodeConfig, *, wait: bool = True, timeout: float = 60.0) -> SuperNode:
    """Start ``flower-supernode``; with ``wait`` return only once the SuperLink accepted it (see ``node_id``).

    With ``wait=False`` the caller watches the process itself (tests of refused nodes do).
    """
    run_dir = Path(config.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    ensure_ports_free([(config.runtime_host, config.runtime_port)], flag_hints={config.runtime_port: "--port"})
    node_config_file = None
    if config.node_config:
        node_config_file = write_flat_toml(
            run_dir / f"{config.name}-node-config.toml", config.node_config, what="node config"
        )
    process = FlowerProcess(
        f"flower-supernode {config.name}",
        config.argv(node_config_file),
        log_path=run_dir / f"{config.name}.log",
        # A home per node: nodes on one machine would otherwise unpack the same app into one directory at once.
        env=flower_env(run_dir / f"{config.name}-flwr-home", extra=config.extra_env),
        cwd=run_dir,
    )
    node = SuperNode(config, process, None)
    if wait:
        try:
            node.wait_connected(timeout=timeout)
        except BaseException:
            process.stop(grace=2.0)
            raise
    return node


def explain_supernode_failure(log: str) -> str:
    """Turn what Flower logged into the reason and the fix, for the person reading a one-line error."""
    if logs.ACTIVATION_REFUSED_CODE in log or logs.ACTIVATION_FAILED in log:
        # Flower answers 2004 both for an unknown key and for a key another SuperNode holds online right now (its
        # SuperLink logs "No SuperNode found" or "could not be activated"): the site cannot tell which, so say both.
        return (
            "the SuperLink refused to activate this node (code 2004): either another client with this same node "
            "key is connected right now (stop it; every site needs its own node-N.key), or the SuperLink does not "
            "know this key (on the SuperLink host run `fedshield keys add-node` for this site, or use the key made "
            "for this site)."
        )
    if logs.AUTH_REQUIRED_CODE in log:
        return "the SuperLink requires node authentication (code 2001); pass this site's node key."
    if logs.TLS_FAILED[0] in log or logs.TLS_FAILED[1] in log.lower():
        return (
            "TLS handshake failed: the SuperLink's certificate is not signed by the CA given with "
            "--root-certificates, or the address is not among its SANs; use the ca.pem from the same key directory."
        )
    if any(marker in log for marker in logs.UNREACHABLE):
        return (
            "the SuperLink is unreachable or closed the connection (a plaintext node against a TLS SuperLink "
            "looks like this); check the address and pass the CA certificate."
        )
    return "see the log below."
