"""Start, use and stop real Flower 1.39 processes: SuperLink, SuperNodes and runs submitted with ``flwr run``.

Everything here drives Flower's own command-line programs as subprocesses, each in its own session with a private
``FLWR_HOME`` and a log file, and stops them by PID (children included). ``fedshield server`` / ``fedshield client``
build on it; so do the end-to-end tests.
"""

from fedshield.deploy.connection import FlwrConnection as FlwrConnection
from fedshield.deploy.connection import TomlValue as TomlValue
from fedshield.errors import DeploymentError as DeploymentError
from fedshield.errors import PortInUseError as PortInUseError
from fedshield.deploy.flwr_run import FINISHED_COMPLETED as FINISHED_COMPLETED
from fedshield.deploy.flwr_run import RunResult as RunResult
from fedshield.deploy.flwr_run import run_app as run_app
from fedshield.deploy.flwr_run import run_status as run_status
from fedshield.deploy.flwr_run import submit_run as submit_run
from fedshield.deploy.flwr_run import wait_for_run as wait_for_run
from fedshield.deploy.process import FlowerProcess as FlowerProcess
from fedshield.deploy.process import ensure_ports_free as ensure_ports_free
from fedshield.deploy.process import free_port as free_port
from fedshield.deploy.superlink import ServerTls as ServerTls
from fedshield.deploy.superlink import SuperLink as SuperLink
from fedshield.deploy.superlink import SuperLinkConfig as SuperLinkConfig
from fedshield.deploy.superlink import start_superlink as start_superlink
from fedshield.deploy.supernode import SuperNode as SuperNode
from fedshield.deploy.supernode import SuperNodeConfig as SuperNodeConfig
from fedshield.deploy.supernode import start_supernode as start_supernode

__all__ = [
    "DeploymentError",
    "FINISHED_COMPLETED",
    "FlowerProcess",
    "FlwrConnection",
    "PortInUseError",
    "RunResult",
    "ServerTls",
    "SuperLink",
    "SuperLinkConfig",
    "SuperNode",
    "SuperNodeConfig",
    "TomlValue",
    "ensure_ports_free",
    "free_port",
    "run_app",
    "run_status",
    "start_superlink",
    "start_supernode",
    "submit_run",
    "wait_for_run",
]
