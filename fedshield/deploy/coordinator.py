"""``fedshield server`` without the printing: keys -> SuperLink -> registered nodes -> the fedshield app -> result.

A deployed run is Flower's: a ``flower-superlink`` process (Fleet API over gRPC with TLS and node authentication,
Control API on loopback) and a run submitted with ``flwr run`` of the packaged app in ``fedshield/flower_app``,
whose ServerApp (:mod:`fedshield.server.app`) writes the same run directory as ``fedshield simulate``. This module
starts and stops those processes by PID and follows the run from its files, because that is all Flower 1.39 gives
us: ``flwr run`` exits 0 even when the ServerApp crashed, so the final status is read from the SuperLink, and the
ServerApp runs in a process of its own, so progress is read from ``<out>/metrics.jsonl`` as rows are appended.

The caller (the CLI) prints; everything here raises :mod:`fedshield.errors` (deployment errors from
:mod:`fedshield.errors`).
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..config import PartitionSpec, RunConfig
from ..crypto import KeySet, load_keyset
from ..deploy import (
    FINISHED_COMPLETED,
    DeploymentError,
    RunResult,
    ServerTls,
    SuperLink,
    SuperLinkConfig,
    TomlValue,
    run_status,
    start_superlink,
    submit_run,
)
from ..deploy.connection import toml_value
from ..deploy.flwr_run import run_log, stop_run
from ..deploy.process import parse_address
from ..errors import ConfigError
from ..protocol import RESUME_KEY
from ..server.checkpoint import load_resume as load_checkpointed_run
from .revocation import revoke_unlisted
from ..server.run_dir import claim_run_dir
from ..server.run_files import MetricsTail, file_identity, read_rows, read_summary
from ..server.records import RoundRecord

__all__ = [
    "DEFAULT_CONTROL_PORT",
    "DEFAULT_FLEET_ADDRESS",
    "FedshieldServer",
    "ServerOptions",
    "app_dir",
    "check_run_dir",
    "flower_run_config",
    "load_resume",
    "prepare_app",
    "read_summary",
    "start_server",
]

DEFAULT_FLEET_ADDRESS = "0.0.0.0:9092"
DEFAULT_CONTROL_PORT = 8000
_STRATEGY_PARAMS = "strategy_params"
_REGISTER_WORKERS = 4
_FINISHED = "finished"


@dataclass(frozen=True)
class ServerOptions:
    """Where the SuperLink listens and which key set it uses.

    ``fleet_address`` is the only port sites need to reach. The Control API (``control_port``) accepts runs and
    node registrations from anyone who reaches it (Flower 1.39 has no login without its enterprise plugins), so it
    is bound to 127.0.0.1 only. ``insecure`` runs without TLS and without node authentication: local experiments
    only.
    """

    keys: Path | None
    fleet_address: str = DEFAULT_FLEET_ADDRESS
    control_port: int = DEFAULT_CONTROL_PORT
    insecure: bool = False

    def __post_init__(self) -> None:
        try:
            parse_address(self.fleet_address)
        except DeploymentError as err:
            raise ConfigError(f"--address: {err} Use e.g. --address 0.0.0.0:9092.") from None
        if isinstance(self.control_port, bool) or not 0 < int(self.control_port) < 65536:
            raise ConfigError(f"--control-port must be a port number 1-65535, got {self.control_port!r}")
        if self.control_port == parse_address(self.fleet_address)[1]:
            raise ConfigError(
                f"--control-port {self.control_port} is the Fleet port of --address {self.fleet_address}: "
                "the SuperLink needs two ports; choose another --control-port"
            )
        if self.keys is None and not self.insecure:
            raise ConfigError(
                "--keys is required: the key directory from `fedshield keys init` (TLS certificate and the "
                "authorized node keys); --insecure runs without TLS and node authentication, for local tests only"
            )


def app_dir() -> Path:
    """The packaged Flower app directory: only a ``pyproject.toml``; the code comes from the installed package."""
    path = Path(str(resources.files("fedshield").joinpath("flower_app")))
    if not (path / "pyproject.toml").is_file():
        raise DeploymentError(
            f"The fedshield Flower app is missing from this install ({path}/pyproject.toml); reinstall fedshield."
        )
    return path


def flower_run_config(config: RunConfig) -> dict[str, TomlValue]:
    """Every RunConfig field as Flower run config: kebab-case keys, absolute ``out``, 0 for "not set".

    ``strategy-params`` is left out: it is a table whose keys depend on the strategy, so :func:`prepare_app`
    declares it in the submitted app instead. The ServerApp runs in a process Flower starts elsewhere (another
    working directory), so a relative ``out`` would land somewhere unexpected: it is made absolute here. The
    result is checked to read back as ``config``, so a new RunConfig field that Flower cannot carry fails here,
    naming itself, rather than silently changing the run.
    """
    values: dict[str, TomlValue] = {}
    for f in dataclasses.fields(config):
        if f.name != _STRATEGY_PARAMS:
            values[f.name.replace("_", "-")] = _run_config_scalar(f.name, getattr(config, f.name))
    values["out"] = str(Path(config.out).expanduser().resolve())
    back = RunConfig.from_mapping(values, base=config, zero_is_unset=True)
    changed = [f.name for f in dataclasses.fields(config)
               if f.name != "out" and getattr(back, f.name) != getattr(config, f.name)]
    if changed:
        raise ConfigError(
            f"settings {', '.join(n.replace('_', '-') for n in changed)} do not survive Flower's run config "
            "(no None there: 0 means unset); set them to an explicit value"
        )
    return values


def prepare_app(config: RunConfig, directory: Path) -> Path:
    """Write the app to submit for ``config`` into ``directory``: the packaged pyproject plus this run's
    ``[tool.flwr.app.config.strategy-params]`` (Flower accepts only run-config keys that the app declares)."""
    text = (app_dir() / "pyproject.toml").read_text(encoding="utf-8")
    params = dict(getattr(config, _STRATEGY_PARAMS, {}) or {})
    if params:
        text += "\n[tool.flwr.app.config.strategy-params]\n"
        for key, value in params.items():
            if not key or not all(ch.isalnum() or ch in "-_" for ch in key):
                raise ConfigError(f"strategy setting {key!r} must be a bare name (letters, digits, '-', '_')")
            text += f"{key} = {toml_value(value)}\n"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "pyproject.toml", text)
    return directory


def _run_config_scalar(name: str, value: Any) -> TomlValue:
    if value is None:
        return 0.0
    if isinstance(value, (Path, PartitionSpec)):
        return str(value)
    if isinstance(value, enum.Enum):
        return _run_config_scalar(name, value.value)
    if isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(
        f"setting {name.replace('_', '-')}={value!r} cannot be sent to a deployed run (Flower's run config holds "
        "numbers, strings and booleans only); set it explicitly"
    )


def check_run_dir(out: Path, *, force: bool = False) -> Path:
    """The absolute run directory of a new run; an existing run there needs ``force`` (see :mod:`fedshield.server.run_dir`)."""
    return claim_run_dir(out, force=force)


class FedshieldServer:
    """A running SuperLink with the federation's nodes registered; submit and follow fedshield runs on it."""

    def __init__(self, superlink: SuperLink, keyset: KeySet | None) -> None:
        self.superlink = superlink
        self.keyset = keyset
        # metrics.jsonl as it was before each run was submitted: an earlier run's file in the same --out
        self._stale: dict[int, tuple[int, int] | None] = {}
        self._done: dict[int, int] = {}  # rounds a resumed run had completed before it was submitted

    @property
    def registered(self) -> tuple[str, ...]:
        return () if self.keyset is None else tuple(n.name for n in self.keyset.nodes)

    def submit(self, config: RunConfig, *, resume: bool = False) -> int:
        """``flwr run`` the packaged app with ``config``; returns the run ID.

        With ``resume`` the ServerApp continues ``config.out`` from its last checkpoint (see
        :func:`load_resume`); the rounds already in its ``metrics.jsonl`` are not reported again.
        """
        out = Path(config.out).expanduser().resolve()
        stale = file_identity(out / "metrics.jsonl")
        overrides: dict[str, TomlValue] = {**flower_run_config(config), RESUME_KEY: bool(resume)}
        app = prepare_app(config, Path(self.superlink.config.run_dir).resolve() / "app")
        run_id = submit_run(app, self.superlink.connection, run_config=overrides)
        self._stale[run_id] = stale
        self._done[run_id] = len(read_rows(out / "metrics.jsonl")) if resume else 0
        return run_id

    def online_nodes(self) -> int:
        """How many registered nodes the SuperLink sees online now (one Control API request)."""
        return sum(1 for n in self.superlink.list_nodes() if n.get("status") == "online")

    def follow(
        self,
        run_id: int,
        config: RunConfig,
        *,
        on_round: Callable[[RoundRecord], None] | None = None,
        on_nodes: Callable[[int], None] | None = None,
        poll_s: float = 0.5,
        status_every_s: float = 15.0,
        timeout: float | None = None,
    ) -> RunResult:
        """Report each finished round from ``<out>/metrics.jsonl`` until the SuperLink says the run finished.

        ``on_nodes(online)`` is called whenever the number of online nodes changes, until the first round ends,
        so a server waiting for its sites says so. A node check and a status check are one Control API request each
        (:func:`~fedshield.deploy.flwr_run.run_status`), made every ``status_every_s`` for failures, and at once when
        the last round's row appears. With ``timeout`` the run is stopped and
        :class:`DeploymentError` raised after that long.
        """
        out = Path(config.out).expanduser().resolve()
        tail = MetricsTail(out, config.num_rounds, self._stale.get(run_id, file_identity(out / "metrics.jsonl")),
                            done=self._done.get(run_id, 0))
        deadline = None if timeout is None else time.monotonic() + timeout
        next_check, next_nodes, last_online = 0.0, 0.0, -1
        while True:
            self._raise_if_superlink_died()
            for record in tail.new_records():
                if on_round is not None:
                    on_round(record)
            now = time.monotonic()
            if now >= next_check or tail.rounds_seen >= config.num_rounds:
                record = run_status(self.superlink.connection, run_id)
                if str(record.get("status", "")).startswith(_FINISHED):
                    result = self._result(run_id, record)
                    for record in tail.new_records(final=True):
                        if on_round is not None:
                            on_round(record)
                    return result
                next_check = time.monotonic() + (poll_s * 4 if tail.rounds_seen >= config.num_rounds else status_every_s)
            waiting = tail.rounds_seen == 0 and last_online < config.num_clients
            if on_nodes is not None and waiting and now >= next_nodes:
                online = self.online_nodes()
                if online != last_online:
                    on_nodes(online)
                    last_online = online
                next_nodes = time.monotonic() + 10.0
            if deadline is not None and time.monotonic() > deadline:
                self.stop_run(run_id)
                raise DeploymentError(
                    f"run {run_id} did not finish within {timeout:.0f} s and was stopped; "
                    f"{tail.rounds_seen} of {config.num_rounds} rounds completed"
                )
            time.sleep(poll_s)

    def _result(self, run_id: int, record: Mapping[str, Any]) -> RunResult:
        """The final status; a run that did not complete carries the ServerApp's log (traceback included)."""
        status, elapsed = str(record.get("status", "")), record.get("elapsed", 0.0)
        return RunResult(
            run_id=run_id, status=status, details=str(record.get("status-details", "")),
            elapsed_s=float(elapsed) if isinstance(elapsed, (int, float)) else 0.0, record=dict(record),
            log="" if status == FINISHED_COMPLETED else run_log(self.superlink.connection, run_id),
        )

    def stop_run(self, run_id: int) -> None:
        """``flwr stop``: the ServerApp ends, the run becomes ``finished:stopped``. Best effort, never raises."""
        stop_run(self.superlink.connection, run_id)

    def close(self, *, grace: float = 10.0) -> None:
        """Stop the SuperLink and everything it started (SuperExec, ServerApp) by PID."""
        self.superlink.stop(grace=grace)

    def __enter__(self) -> FedshieldServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _raise_if_superlink_died(self) -> None:
        process = self.superlink.process
        if not process.is_running():
            raise DeploymentError(
                f"the SuperLink exited (status {process.returncode}); its log {process.log_path} ends:\n"
                f"{process.log_tail()}"
            )


def start_server(options: ServerOptions, *, home: Path, timeout: float = 60.0) -> FedshieldServer:
    """Check the key set, start the SuperLink under ``home`` and register every authorized node key.

    ``home`` keeps the SuperLink's log, its state database (node registrations survive a restart with the same
    ``home``) and private Flower homes. Raises :class:`~fedshield.errors.KeyMaterialError` for a bad key set and
    :class:`~fedshield.deploy.PortInUseError` for a taken port, before anything starts.
    """
    keyset = None if options.insecure else load_keyset(Path(options.keys))  # type: ignore[arg-type]
    if keyset is not None and not keyset.nodes:
        raise ConfigError(
            f"{keyset.authorized_nodes} lists no nodes, so no site could join; "
            f"add one with `fedshield keys add-node --keys {keyset.directory}`"
        )
    home = Path(home).expanduser().resolve()
    config = SuperLinkConfig(
        run_dir=home,
        fleet_address=options.fleet_address,
        control_port=options.control_port,
        tls=None if keyset is None else ServerTls.from_keyset(keyset),
        insecure=keyset is None,
        node_auth=keyset is not None,
        database=home / "superlink-state.db",
    )
    superlink = start_superlink(config, timeout=timeout)
    try:
        if keyset is not None:
            _register(superlink, keyset)
            revoke_unlisted(superlink, keyset)
    except BaseException:
        superlink.stop(grace=5.0)
        raise
    return FedshieldServer(superlink, keyset)


def _register(superlink: SuperLink, keyset: KeySet) -> None:
    """Register every authorized key, a few at a time: each registration is a ``flwr`` process (~2 s), so a
    federation of 100 sites would otherwise wait minutes. Keys already known (a restart) are not an error."""
    nodes = list(keyset.nodes)
    with ThreadPoolExecutor(max_workers=_REGISTER_WORKERS) as pool:
        for future in [pool.submit(superlink.register_node, n.public_key, name=n.name) for n in nodes]:
            future.result()


def load_resume(run_dir: Path) -> tuple[RunConfig, int]:
    """The settings of the deployed run in ``run_dir`` and the round its last checkpoint completed.

    A resumed run continues with its original settings (its clients' ledgers were charged under them), so they
    come from ``config.json``; the checkpoint is read by the ServerApp itself and checked here first, so a
    missing or corrupt one is a one-line error before anything starts.
    """
    config, checkpoint = load_checkpointed_run(Path(run_dir).expanduser().resolve())
    if checkpoint.server_round >= config.num_rounds:
        raise ConfigError(
            f"--resume {run_dir}: all {config.num_rounds} rounds are already done; start a new run with --out"
        )
    return config, checkpoint.server_round
