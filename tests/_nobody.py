"""An unprivileged local user (``nobody``) as a real attacker process: its own directory, Flower's code, no keys.

The tests run as root (as in CI); the attacker runs through ``setpriv --reuid nobody --regid nogroup
--clear-groups`` with only what a local user can read: Flower's installed code, the world-readable ``ca.pem``
and its own files. The virtualenv's interpreter may live under a home directory that ``nobody`` cannot enter
(here ``/root/.pyenv``); the system interpreter of the same minor version then loads the same site-packages, as a
local user would.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import flwr

from fedshield.deploy.connection import FlwrConnection

__all__ = ["Nobody", "SETPRIV"]

SETPRIV = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups"]
_FLWR_CLI = "import sys; sys.argv[0] = 'flwr'; from flwr.cli.app import app; sys.exit(app())"


def _python_for_nobody() -> str:
    """An interpreter ``nobody`` can execute that matches ours (same minor version: same compiled extensions)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        done = subprocess.run([*SETPRIV, candidate, "-c", "import sys; print(sys.version_info[:2])"],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode == 0 and done.stdout.strip() == str(sys.version_info[:2]):
            return candidate
    raise RuntimeError(f"no Python {version} that user nobody can run: install python{version} system-wide")


@dataclass
class Nobody:
    """A private directory owned by ``nobody`` and the means to run Python or ``flwr`` as that user."""

    home: Path
    python: str

    @classmethod
    def create(cls) -> Nobody:
        home = Path(tempfile.mkdtemp(prefix="fedshield-nobody-"))
        home.chmod(0o755)
        os.chown(home, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
        return cls(home, _python_for_nobody())

    def give(self, source: Path, name: str) -> Path:
        """Copy a file the attacker may read (a world-readable ``ca.pem``) into its directory."""
        target = self.home / name
        shutil.copyfile(source, target)
        self._own(target)
        return target

    def env(self) -> dict[str, str]:
        site_packages = str(Path(flwr.__file__).resolve().parents[1])
        return {
            "PATH": "/usr/bin:/bin", "HOME": str(self.home), "FLWR_HOME": str(self.home / "flwr-home"),
            "PYTHONPATH": site_packages, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
        }  # fmt: skip

    def connect(self, address: str, ca: Path) -> str:
        """A ``flwr`` connection named ``target`` to ``address`` in the attacker's own ``FLWR_HOME``."""
        FlwrConnection("target", address, self.home / "flwr-home", root_certificates=ca).write_config()
        for path in [self.home / "flwr-home", *(self.home / "flwr-home").rglob("*")]:
            self._own(path)
        return "target"

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*SETPRIV, self.python, "-c", _FLWR_CLI, *args], cwd=self.home, env=self.env(),
                              capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip

    def start_python(self, code: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            return subprocess.Popen([*SETPRIV, self.python, "-c", code, *args], cwd=self.home, env=self.env(),
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip

    def remove(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)

    def _own(self, path: Path) -> None:
        os.chown(path, pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid)
