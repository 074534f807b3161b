"""Reach a fedshield server before the SuperNode starts: TCP with retries and backoff, then a TLS handshake.

Flower's SuperNode reports a wrong CA, a server name missing from the certificate or a TLS/plaintext mismatch late
and tersely (it retries, then exits with a code and the reason only in its log). Probing first turns each of these
into one sentence with the fix, before anything is started.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import DeploymentError

__all__ = ["RetryHook", "wait_for_server"]

_PROBE_TIMEOUT_S = 5.0
# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH: the certificate is fine but names other hosts.
_NAME_MISMATCH = (62, 64)

#: Called before each wait between connection attempts: (attempt that failed, attempts, seconds to wait, reason).
RetryHook = Callable[[int, int, float, str], None]


def wait_for_server(
    host: str,
    port: int,
    *,
    ca_cert: Path | None,
    attempts: int,
    retry_wait: float,
    max_retry_wait: float = 60.0,
    on_retry: RetryHook | None = None,
) -> int:
    """Connect to the server's Fleet port, with backoff; returns the attempt that succeeded.

    With ``ca_cert`` a TLS handshake is made too, verifying the certificate against that CA and the host name,
    the way the SuperNode will. Network failures are retried; TLS failures are not (they will not heal) and raise
    :class:`DeploymentError` with the fix at once.
    """
    reason = ""
    for attempt in range(1, attempts + 1):
        try:
            _probe(host, port, ca_cert)
            return attempt
        except _Unreachable as err:
            reason = str(err)
        if attempt < attempts:
            wait = min(retry_wait * 2 ** (attempt - 1), max_retry_wait)
            if on_retry is not None:
                on_retry(attempt, attempts, wait, reason)
            time.sleep(wait)
    raise DeploymentError(
        f"cannot reach the server at {_address(host, port)} after {attempts} attempts ({reason}): check the "
        "address, the firewall, and that `fedshield server` is running"
    )


class _Unreachable(Exception):
    """No TCP connection (refused, timed out, no route): worth retrying."""


def _probe(host: str, port: int, ca_cert: Path | None) -> None:
    try:
        sock = socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S)
    except OSError as err:
        raise _Unreachable(err.strerror or type(err).__name__) from err
    with sock:
        if ca_cert is None:
            _refuse_tls_server(sock, host, port)
            return
        _handshake(sock, host, port, ca_cert)


def _refuse_tls_server(sock: socket.socket, host: str, port: int) -> None:
    """An --insecure client against a TLS server would wait for minutes and then blame its log: if a TLS
    handshake (certificate unchecked: only whether the server speaks TLS at all) completes, say so now."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with context.wrap_socket(sock, server_hostname=host):
            pass
    except (ssl.SSLError, OSError):
        return  # not TLS: a plaintext (--insecure) server, as this client expects
    raise DeploymentError(
        f"the server at {_address(host, port)} uses TLS but this client runs with --insecure: drop --insecure and "
        "pass --ca ca.pem and --node-key node-N.key from the server's `fedshield keys init`"
    )


def _handshake(sock: socket.socket, host: str, port: int, ca_cert: Path) -> None:
    where = _address(host, port)
    context = ssl.create_default_context(cafile=str(ca_cert))
    context.set_alpn_protocols(["h2"])  # what gRPC offers; a TLS server that only speaks h2 accepts it
    try:
        with context.wrap_socket(sock, server_hostname=host):
            return
    except ssl.SSLCertVerificationError as err:
        if err.verify_code in _NAME_MISMATCH:
            raise DeploymentError(
                f"the server's TLS certificate does not name {host!r} ({err.verify_message}): connect with a name or "
                "address it was issued for, or re-issue it with `fedshield keys init --server-host ...` including "
                f"{host}"
            ) from None
        raise DeploymentError(
            f"TLS check of the server at {where} failed ({err.verify_message}): its certificate is not signed by "
            f"the CA in {ca_cert}; use the ca.pem from the same `fedshield keys init` directory as the server's keys"
        ) from None
    except (ssl.SSLError, OSError) as err:
        raise DeploymentError(
            f"the server at {where} did not complete a TLS handshake ({_one_line(str(err))}): it may run with "
            "--insecure (then this client needs --insecure too, local tests only), or the port belongs to another "
            "service"
        ) from None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
