"""One documented exception tree for fedshield.

The library raises these; only :mod:`fedshield.cli` turns them into an exit code. Every message says what was
expected, what was got, and how to fix it, because the person reading it is often on another machine.
"""

from __future__ import annotations

__all__ = [
    "FedshieldError",
    "ConfigError",
    "DataError",
    "PrivacyError",
    "BudgetExhaustedError",
    "LedgerError",
    "KeyMaterialError",
    "ProtocolError",
    "DeploymentError",
    "PortInUseError",
]


class FedshieldError(Exception):
    """Base class of every error fedshield raises on purpose."""


class ConfigError(FedshieldError, ValueError):
    """A setting (CLI flag, config-file key, Flower run config) is missing, malformed or out of range."""


class DataError(FedshieldError, ValueError):
    """Local data cannot be read, or does not fit the task (feature count, label values, too few samples)."""


class PrivacyError(FedshieldError):
    """A privacy mechanism or its accounting cannot deliver the guarantee that was asked for."""


class BudgetExhaustedError(PrivacyError):
    """Training one more round would take a client past its privacy budget; the client refuses."""


class LedgerError(PrivacyError):
    """A privacy ledger on disk is unreadable or belongs to another mechanism; it is never silently reset."""


class KeyMaterialError(FedshieldError):
    """Keys or certificates are missing, unreadable, or do not belong together."""


class ProtocolError(FedshieldError):
    """A message between server and client does not follow the fedshield wire contract."""


class DeploymentError(FedshieldError):
    """A Flower process did not start, exited early, refused us, or a run did not reach a final status in time."""


class PortInUseError(DeploymentError, ConfigError):
    """A port we were asked to listen on is already taken; the fix is another port or stopping the other server."""
