"""Talking to a SuperLink's Control API through the ``flwr`` CLI, with a connection in a private ``FLWR_HOME``.

On Flower 1.39 ``flwr`` takes a *connection name*, looked up in ``$FLWR_HOME/config.toml``::

    [superlink]
    default = "fedshield"

    [superlink.fedshield]
    address = "127.0.0.1:8000"          # the SuperLink's --host/--port (Control API), not the Fleet port
    root-certificates = "/abs/ca.pem"   # or: insecure = true

We write that file into a directory of our own and point ``FLWR_HOME`` at it, so the user's ``~/.flwr`` is never
read or changed. Two pitfalls are handled here: with ``--format json`` a failed command exits 0 and reports
``"success": false``, and the human output goes to stdout mixed with the JSON in some versions, so we parse only
the outermost JSON object.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedshield.atomic import atomic_write_text
from fedshield.errors import DeploymentError
from fedshield.deploy.process import flower_env, flower_executable

__all__ = ["FlwrConnection", "TomlValue", "read_connection", "toml_value", "write_flat_toml"]

TomlValue = str | int | float | bool


def toml_value(value: TomlValue) -> str:
    """One TOML scalar. JSON string escapes are valid TOML basic-string escapes, so ``json.dumps`` quotes safely."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DeploymentError(f"TOML config values must be finite numbers, got {value!r}.")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise DeploymentError(f"Config values must be str, int, float or bool, got {type(value).__name__} ({value!r}).")


@dataclass(frozen=True)
class FlwrConnection:
    """A named SuperLink connection for the ``flwr`` CLI, stored in ``flwr_home/config.toml``."""

    name: str
    address: str
    flwr_home: Path
    root_certificates: Path | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if (self.root_certificates is None) != self.insecure:
            raise DeploymentError(
                f"Connection {self.name!r} needs exactly one of root_certificates (TLS, the CA that signed the "
                f"SuperLink certificate) or insecure=True; got root_certificates={self.root_certificates}, "
                f"insecure={self.insecure}."
            )

    def write_config(self) -> Path:
        """(Re)write ``config.toml`` with this connection as the default and the only one."""
        lines = ["[superlink]", f"default = {toml_value(self.name)}", "", f"[superlink.{self.name}]"]
        lines.append(f"address = {toml_value(self.address)}")
        if self.root_certificates is not None:
            lines.append(f"root-certificates = {toml_value(str(Path(self.root_certificates).resolve()))}")
        else:
            lines.append("insecure = true")
        path = self.flwr_home / "config.toml"
        atomic_write_text(path, "\n".join(lines) + "\n")
        return path

    def run_cli(self, args: Sequence[str], *, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` against this connection's home; the caller checks the result."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if not (self.flwr_home / "config.toml").is_file():
            self.write_config()
        command = [flower_executable("flwr"), *args]
        try:
            # cwd is our own home: `flwr` migrates a [tool.flwr.federations] table it finds in ./pyproject.toml
            # and rewrites that file, which must never happen to a user's project.
            return subprocess.run(
                command, cwd=self.flwr_home, env=flower_env(self.flwr_home), capture_output=True, text=True,
                timeout=timeout, stdin=subprocess.DEVNULL, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(
                f"`{' '.join(command)}` did not finish within {timeout:.0f} s; is the SuperLink at {self.address} up?"
            ) from err

    def run_json(self, args: Sequence[str], *, timeout: float = 60.0) -> dict[str, Any]:
        """Run ``flwr ARGS --format json`` and return the reply; any failure becomes a :class:`DeploymentError`."""
        reply, error = self.try_json(args, timeout=timeout)
        if reply is None:
            raise DeploymentError(f"`flwr {' '.join(args)}` failed: {error}")
        return reply

    def try_json(self, args: Sequence[str], *, timeout: float = 60.0) -> tuple[dict[str, Any] | None, str]:
        """Run ``flwr ARGS --format json``; return ``(reply, "")`` on success, ``(None, Flower's message)`` if not."""
        done = self.run_cli([*args, "--format", "json"], timeout=timeout)
        reply = _parse_json_reply(done.stdout)
        if done.returncode == 0 and reply is not None and reply.get("success") is True:
            return reply, ""
        detail = (reply or {}).get("error-message") or done.stderr or done.stdout
        return None, f"exit {done.returncode}: {_one_line(str(detail))}"


def read_connection(flwr_home: Path) -> FlwrConnection | None:
    """The default connection a fedshield SuperLink wrote into ``flwr_home/config.toml``; None if there is none."""
    import tomllib

    try:
        table = tomllib.loads((Path(flwr_home) / "config.toml").read_text(encoding="utf-8"))["superlink"]
        name = str(table["default"])
        entry = table[name]
        root = entry.get("root-certificates")
        return FlwrConnection(name=name, address=str(entry["address"]), flwr_home=Path(flwr_home),
                              root_certificates=None if root is None else Path(root), insecure=root is None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DeploymentError):
        return None


def _parse_json_reply(stdout: str) -> dict[str, Any] | None:
    start, end = stdout.find("{"), stdout.rfind("}")
    if start < 0 or end < start:
        return None
    try:
        reply = json.loads(stdout[start : end + 1])
    except json.JSONDecodeError:
        return None
    return reply if isinstance(reply, dict) else None


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def write_flat_toml(path: Path, values: Mapping[str, TomlValue], *, what: str) -> Path:
    """Write ``key = value`` lines; Flower reads such a file for ``--run-config`` and ``--node-config``.

    A file instead of ``'k1=v1 k2="v2"'`` on the command line: Flower splits that string with a regex, so a value
    holding a space, a quote or a backslash would be cut or mis-escaped.
    """
    for key in values:
        if not key or not all(ch.isalnum() or ch in "-_" for ch in key):
            raise DeploymentError(f"{what} key {key!r} must be a bare TOML key (letters, digits, '-', '_').")
    atomic_write_text(path, "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    return path
