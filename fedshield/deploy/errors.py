"""Errors raised while starting, talking to or stopping Flower processes.

They sit under :class:`fedshield.errors.FedshieldError`, so the CLI's one handler turns them into a one-line message
and exit code 2 like every other fedshield error.
"""

from __future__ import annotations

from fedshield.errors import ConfigError, FedshieldError

__all__ = ["DeploymentError", "PortInUseError"]


class DeploymentError(FedshieldError):
    """A Flower process did not start, exited early, refused us, or a run did not reach a final status in time."""


class PortInUseError(DeploymentError, ConfigError):
    """A port we were asked to listen on is already taken; the fix is another port or stopping the other server."""
