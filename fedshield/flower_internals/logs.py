"""What fedshield looks for in Flower's process logs and error texts (Flower 1.39 spells them so)."""

from __future__ import annotations

__all__ = [
    "ACTIVATION_FAILED", "ACTIVATION_REFUSED_CODE", "ACTIVATION_REFUSED_SHORT", "ALREADY_REGISTERED", "AUTH_REQUIRED_CODE", "EXIT_CODE",
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
