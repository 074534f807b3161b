"""What fedshield looks for in Flower's process logs and error texts (Flower 1.39 spells them so), and the level of
Flower's own logger."""

from __future__ import annotations

import logging

__all__ = [
    "set_flower_log_level", "ACTIVATION_FAILED", "ACTIVATION_REFUSED_CODE", "ACTIVATION_REFUSED_SHORT", "ALREADY_REGISTERED", "AUTH_REQUIRED_CODE", "EXIT_CODE",
    "SUPERNODE_CONNECTED", "TLS_FAILED", "UNREACHABLE",
]

#: The SuperNode logs this (with its node ID) once it is connected and activated (regex, group 1: the ID).
SUPERNODE_CONNECTED = r"SuperNode ID: (\d+)"
#: A SuperNode refused activation: an unknown key, or one another SuperNode holds online (gRPC code 2004).
ACTIVATION_REFUSED_CODE = "[code: 2004]"
#: The same refusal as ``fedshield client`` reports it after it re-reads the SuperNode's exit.
ACTIVATION_REFUSED_SHORT = "code 2004"
ACTIVATION_FAILED = "Failed to activate SuperNode"
#: The SuperLink requires node authentication and the SuperNode gave no key.
AUTH_REQUIRED_CODE = "[code: 2001]"
#: gRPC / TLS failures as they appear in the SuperNode log.
TLS_FAILED = ("CERTIFICATE_VERIFY_FAILED", "handshake")
UNREACHABLE = ("Socket closed", "UNAVAILABLE")
#: ``flwr supernode register`` for a key that is already registered.
ALREADY_REGISTERED = "Public key already in use"
#: Flower's CLI reports a failed command's exit code so (regex, group 1: the code).
EXIT_CODE = r"Exit Code: (\d+)"


def set_flower_log_level(level: int) -> None:
    """Set Flower's ``flwr`` logger to ``level``, for good.

    Why here: Flower's logger module (``flwr.supercore.logger``) sets that logger to DEBUG when it is first imported,
    and the CLI imports Flower lazily, after choosing the level: the default run printed Flower's whole log. Importing
    the module first makes the level stick.
    """
    import flwr.supercore.logger  # noqa: F401  # pylint: disable=unused-import,import-outside-toplevel

    logging.getLogger("flwr").setLevel(level)
