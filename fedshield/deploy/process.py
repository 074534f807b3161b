"""One Flower process that we started: its own session, its log file, and a stop by PID that reaches its children.

Flower's servers start helpers of their own: a SuperLink starts ``flower-superexec`` in a *new session*
(``start_new_session=True``), which in turn starts ``flwr-serverapp``; a SuperNode starts a SuperExec and one
``flwr-clientapp`` per message. Killing the PID we launched would orphan them, so :class:`FlowerProcess` keeps
every process group it has seen under its PID (read from ``/proc``) and signals all of them on :meth:`stop`.
When we die without stopping it (SIGKILL), the kernel kills it (:func:`~fedshield.deploy.lifetime.die_with_parent`)
and Flower's own parent monitors end its helpers.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from fedshield.errors import DeploymentError, PortInUseError
from fedshield.flower_internals.logs import EXIT_CODE
from fedshield.deploy.lifetime import die_with_parent

__all__ = [
    "FlowerProcess",
    "flower_env",
    "flower_executable",
    "free_port",
    "ensure_ports_free",
    "live_descendants",
    "parse_address",
    "strip_ansi",
]

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_EXIT_CODE = re.compile(EXIT_CODE)
_POLL_S = 0.1


def strip_ansi(text: str) -> str:
    """Flower colours its log lines even when they go to a file or a pipe; drop the escape codes."""
    return _ANSI.sub("", text)


def flower_executable(name: str) -> str:
    """Path of a Flower console script, preferring the one next to this interpreter (the same venv as ``flwr``)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(
            f"Cannot find the Flower command {name!r} next to {sys.executable} or on PATH; "
            "install it in this environment with `pip install 'flwr[simulation]>=1.39,<1.40'`."
        )
    return found


#: Seconds between a SuperExec's checks for work, as Flower's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` reads it.
SUPEREXEC_POLL_S = "0.1"


def flower_env(flwr_home: Path, *, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower child process: a private ``FLWR_HOME`` and no calls home.

    A private ``FLWR_HOME`` keeps apps, connections and credentials out of the user's ``~/.flwr``. Telemetry and the
    update check are switched off because a private-FL deployment must not contact third parties on its own.
    """
    env = dict(os.environ)
    # Flower starts its helpers by bare name (`flower-superexec`, `flwr-serverapp`, `flwr-clientapp`): put this
    # interpreter's scripts first on PATH, or a venv used without activation (`.venv/bin/fedshield`) cannot start
    # them and the SuperLink dies with "No such file or directory: 'flower-superexec'".
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, *[p for p in env.get("PATH", "").split(os.pathsep) if p and p != scripts]])
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # How often a SuperExec looks for a ServerApp/ClientApp to launch (Flower's default: 1 s). Every message to a
    # SuperNode starts a ClientApp (SecAgg+: five a round), so this adds up. An operator's own value wins.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", SUPEREXEC_POLL_S)
    env.update(extra or {})
    return env


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too) into host and port, with a fedshield error for anything else."""
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DeploymentError(f"Expected an address HOST:PORT (e.g. 127.0.0.1:9092), got {address!r}.")
    return host, int(port_text)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now on ``host`` (another process may still take it before we do)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ensure_ports_free(endpoints: Iterable[tuple[str, int]], *, flag_hints: Mapping[int, str] | None = None) -> None:
    """Fail with :class:`PortInUseError` naming the port and the fix if any endpoint is already listening.

    Checking first gives one clear message before anything starts: Flower 1.39 reports a busy Fleet port as a
    ``SystemExit`` traceback inside uvicorn's startup ("Application startup failed"), and a busy HTTP port only
    after it has started its gRPC servers and SuperExec.
    """
    for host, port in endpoints:
        if not _can_bind(host, port):
            flag = (flag_hints or {}).get(port, "the port option")
            raise PortInUseError(
                f"Port {port} on {host} is already in use; stop the process that listens there "
                f"(`ss -ltnp 'sport = :{port}'` shows it) or choose another port with {flag}."
            )


def _can_bind(host: str, port: int) -> bool:
    # SO_REUSEADDR so a port in TIME_WAIT after our own restart counts as free (servers set it too); on Linux it
    # still refuses to bind beside a listening socket, which is what we want to detect.
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    return False
                raise DeploymentError(f"Cannot bind {host}:{port} ({err.strerror}); check the host name.") from err
    return True


class FlowerProcess:
    """A Flower command running in its own session, with stdout and stderr in ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str],
        cwd: Path,
    ) -> None:
        self.name = name
        self.argv = tuple(argv)
        self.log_path = Path(log_path)
        self._groups: set[int] = set()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Appending keeps the history of earlier runs under the same name; we read only our own part of it, so an
        # old "connected" line can never be mistaken for this process's.
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            # start_new_session: the process leads its own group, so one killpg reaches everything it spawns
            # in-session, and a Ctrl-C in the user's terminal does not hit it before we can stop it cleanly.
            # preexec_fn: the process dies with us, even when we are SIGKILLed (see die_with_parent).
            self._popen = subprocess.Popen(
                list(argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env), cwd=cwd, start_new_session=True, preexec_fn=die_with_parent(),
            )  # fmt: skip
        self._groups.add(self._popen.pid)

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has ended, else ``None``."""
        return self._popen.poll()

    def is_running(self) -> bool:
        return self._popen.poll() is None

    def log_text(self) -> str:
        """What this process has logged so far, with Flower's colour codes removed."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return strip_ansi(log.read().decode("utf-8", errors="replace"))
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 25) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def flower_exit_code(self) -> int | None:
        """Flower's own exit code from the log (e.g. 305); the OS exit status of every Flower error is just 1."""
        codes = _EXIT_CODE.findall(self.log_text())
        return int(codes[-1]) if codes else None

    def wait(self, timeout: float) -> int:
        """Wait for the process to end by itself; :class:`DeploymentError` if it is still running after ``timeout``."""
        try:
            return self._popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise DeploymentError(
                f"{self.name} (PID {self.pid}) was expected to exit within {timeout:.0f} s but is still running."
            ) from err

    def wait_for_ports(self, endpoints: Sequence[tuple[str, int]], *, timeout: float) -> None:
        """Return once every endpoint accepts TCP connections; fail early with the log tail if the process exits."""
        deadline = time.monotonic() + timeout
        pending = list(endpoints)
        while pending:
            self._raise_if_exited("while starting")
            pending = [ep for ep in pending if not _accepts(*ep)]
            if pending and time.monotonic() > deadline:
                where = ", ".join(f"{h}:{p}" for h, p in pending)
                raise DeploymentError(
                    f"{self.name} did not listen on {where} within {timeout:.0f} s; its log {self.log_path} ends:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(_POLL_S)
        self.refresh_groups()

    def wait_for_log(self, pattern: str, *, timeout: float) -> re.Match[str]:
        """Return the first match of ``pattern`` in the log; the caller explains an early exit (see ``returncode``)."""
        compiled = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = compiled.search(self.log_text())
            if match is not None:
                self.refresh_groups()
                return match
            if not self.is_running():
                raise DeploymentError(
                    f"{self.name} exited (status {self.returncode}, Flower code {self.flower_exit_code()}) before "
                    f"logging {pattern!r}; its log {self.log_path} ends:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{self.name} did not log {pattern!r} within {timeout:.0f} s; its log {self.log_path} ends:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def refresh_groups(self) -> None:
        """Remember the process group of every live descendant, so :meth:`stop` still finds orphans later."""
        table = _proc_table()
        self._groups.update(table[pid][1] for pid in _descendants(self.pid, table))

    def remaining_pids(self) -> list[int]:
        """Live (non-zombie) processes left in any group this process or its descendants ever used."""
        self_group = os.getpgid(0)
        return sorted(
            pid
            for pid, (_, group, state) in _proc_table().items()
            if group in self._groups and group != self_group and state != "Z" and pid != os.getpid()
        )

    def stop(self, *, grace: float = 10.0) -> int | None:
        """SIGTERM every group, SIGKILL what is left after ``grace`` seconds; returns the exit status."""
        if self.is_running():
            self.refresh_groups()
        self._signal_groups(signal.SIGTERM)
        try:
            self._popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self._signal_groups(signal.SIGKILL)
            self._popen.wait(timeout=5.0)
        if not self._wait_groups_empty(grace):
            self._signal_groups(signal.SIGKILL)
            self._wait_groups_empty(5.0)
        return self._popen.returncode

    def __enter__(self) -> FlowerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _signal_groups(self, sig: signal.Signals) -> None:
        own = os.getpgid(0)
        for group in self._groups:
            if group == own:
                continue  # never signal our own group (the test runner or the fedshield CLI)
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass  # the group is gone (PermissionError: the ID was reused by someone else's group)

    def _wait_groups_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.remaining_pids():
            if time.monotonic() > deadline:
                return False
            time.sleep(_POLL_S)
        return True

    def _raise_if_exited(self, when: str) -> None:
        if self.is_running():
            return
        raise DeploymentError(
            f"{self.name} exited {when} (status {self.returncode}, Flower code {self.flower_exit_code()}); "
            f"its log {self.log_path} ends:\n{self.log_tail()}"
        )


def live_descendants(pid: int | None = None) -> list[int]:
    """PIDs of the running (non-zombie) descendants of ``pid`` (default: this process); Linux ``/proc`` only.

    Zombies are left out on purpose: in containers whose PID 1 does not reap (no ``--init``), Flower's orphaned
    SuperExec processes linger as zombies after a clean stop, and they hold no resources.
    """
    root = os.getpid() if pid is None else pid
    table = _proc_table()
    return sorted(p for p in _descendants(root, table) if p != root and table[p][2] != "Z")


def _accepts(host: str, port: int) -> bool:
    connect_host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    try:
        with socket.create_connection((connect_host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _proc_table() -> dict[int, tuple[int, int, str]]:
    """``pid -> (ppid, process group, state)`` for every process visible in ``/proc`` (Linux only)."""
    table: dict[int, tuple[int, int, str]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited while we looked
        # The command name is in parentheses and may contain spaces: parse after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def _descendants(root: int, table: Mapping[int, tuple[int, int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        if pid in table:
            found.append(pid)
        stack.extend(children.get(pid, []))
    return found
