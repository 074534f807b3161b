"""Submit a Flower app to a SuperLink with ``flwr run`` and wait for the run's *real* final status.

``flwr run --stream`` exits 0 even when the ServerApp crashed, so the exit status of ``flwr run`` says only that
the run was submitted. We submit without ``--stream`` (``--format json`` gives the run ID), then poll
``flwr list --run-id ID --format json`` until the status is ``finished:<completed|failed|stopped>``. The run's own
log (``flwr log ID --show``) is attached to a failed result so the reason travels with it.

Commands, as verified on 1.39::

    flwr run APP_DIR CONNECTION --run-config /abs/overrides.toml --format json
    flwr list CONNECTION --run-id RUN_ID --format json      # "status": "finished:completed"
    flwr log RUN_ID CONNECTION --show
    flwr stop RUN_ID CONNECTION
"""

from __future__ import annotations

import time
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedshield.deploy.connection import FlwrConnection, TomlValue, write_flat_toml
from fedshield.errors import DeploymentError
from fedshield.deploy.process import strip_ansi

__all__ = ["FINISHED_COMPLETED", "RunResult", "run_app", "run_log", "run_status", "stop_run", "submit_run", "wait_for_run"]

FINISHED_COMPLETED = "finished:completed"
_FINISHED = "finished"


@dataclass(frozen=True)
class RunResult:
    """Final state of one run as the SuperLink reports it; ``log`` is filled for runs that did not complete."""

    run_id: int
    status: str
    details: str
    elapsed_s: float
    record: Mapping[str, Any]
    log: str = ""

    @property
    def completed(self) -> bool:
        return self.status == FINISHED_COMPLETED


def submit_run(
    app_dir: Path,
    connection: FlwrConnection,
    *,
    run_config: Mapping[str, TomlValue] | None = None,
    timeout: float = 120.0,
) -> int:
    """``flwr run`` the app in ``app_dir``; returns the run ID. Keys of ``run_config`` must exist in its pyproject."""
    app_dir = Path(app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise DeploymentError(f"{app_dir} is not a Flower app: it has no pyproject.toml with [tool.flwr.app].")
    args = ["run", str(app_dir), connection.name]
    overrides = None
    if run_config:
        _check_run_config_keys(app_dir, run_config)
        overrides = write_flat_toml(_overrides_path(connection), run_config, what="run config")
        args += ["--run-config", str(overrides)]
    try:
        started = _start_run_in_process(app_dir, connection, overrides)
        if started is not None:
            return started
        reply = connection.run_json(args, timeout=timeout)
    finally:
        if overrides is not None:
            overrides.unlink(missing_ok=True)
    try:
        return int(reply["run-id"])
    except (KeyError, TypeError, ValueError) as err:
        raise DeploymentError(f"`flwr run` succeeded but returned no run ID: {reply}") from err


def _start_run_in_process(app_dir: Path, connection: FlwrConnection, overrides: Path | None) -> int | None:
    """What ``flwr run`` does, in this process (:func:`fedshield.flower_internals.control.start_run`: the same
    validation, app bundle and request, without a process importing Flower's CLI, ~2.7 s of CPU); None when
    Flower's modules moved (the caller runs the command)."""
    try:
        from fedshield.flower_internals.control import start_run
    except ImportError:
        return None
    try:
        return start_run(connection.address, root_certificates=connection.root_certificates, app_dir=app_dir,
                         run_config_file=overrides)
    except ImportError:
        return None
    except Exception as err:  # noqa: BLE001  invalid app, HTTP failure: one line, as `flwr run` failing gave
        detail = " ".join(str(err).split()[:40]) or type(err).__name__
        raise DeploymentError(f"Starting a run of {app_dir} on {connection.address} failed: {detail}") from err


def run_status(connection: FlwrConnection, run_id: int) -> dict[str, Any]:
    """The SuperLink's record of one run (``status``, ``status-details``, ``elapsed``, timestamps, traffic).

    Asked in this process through Flower's Control API client (:mod:`fedshield.flower_internals.control`: one
    HTTPS request instead of a ``flwr list`` process, ~1.3 s of CPU, per check), with exactly the record that
    ``flwr list --run-id ID --format json`` prints; through that command when Flower's CLI modules are not as in 1.39.
    """
    try:
        from fedshield.flower_internals.control import run_record

        found = run_record(connection.address, root_certificates=connection.root_certificates, run_id=run_id)
    except ImportError:
        found = _listed_run(connection.run_json(["list", connection.name, "--run-id", str(run_id)]), run_id)
    except Exception as err:  # noqa: BLE001  httpx/protobuf errors: one line, as `flwr list` failing gave
        if getattr(getattr(err, "response", None), "status_code", None) == 404:  # Flower's answer for an unknown ID
            raise DeploymentError(f"The SuperLink at {connection.address} has no run {run_id}.") from None
        detail = " ".join(str(err).split()[:12]) or type(err).__name__
        raise DeploymentError(f"Asking the SuperLink at {connection.address} for run {run_id} failed: {detail}; "
                              "is the SuperLink up?") from err
    if found is None:
        raise DeploymentError(f"The SuperLink at {connection.address} has no run {run_id}.")
    return found


def _listed_run(reply: Mapping[str, Any], run_id: int) -> dict[str, Any] | None:
    for run in reply.get("runs", []):
        if isinstance(run, dict) and str(run.get("run-id")) == str(run_id):
            return run
    return None


def wait_for_run(
    connection: FlwrConnection,
    run_id: int,
    *,
    timeout: float,
    poll_interval: float = 2.0,
    stop_on_timeout: bool = True,
) -> RunResult:
    """Poll until the run finishes; after ``timeout`` seconds stop it (by default) and raise.

    Each poll is one request to the SuperLink's Control API (:func:`run_status`).
    """
    deadline = time.monotonic() + timeout
    while True:
        record = run_status(connection, run_id)
        status = str(record.get("status", ""))
        if status.startswith(_FINISHED):
            return _result(connection, run_id, record)
        if time.monotonic() > deadline:
            if stop_on_timeout:
                stop_run(connection, run_id)
            raise DeploymentError(
                f"Run {run_id} is still {status!r} after {timeout:.0f} s"
                + ("; it was stopped." if stop_on_timeout else ".")
                + " Check that enough SuperNodes are connected (`flwr supernode list`) and raise the timeout."
            )
        time.sleep(poll_interval)


def run_app(
    app_dir: Path,
    connection: FlwrConnection,
    *,
    run_config: Mapping[str, TomlValue] | None = None,
    timeout: float = 600.0,
    poll_interval: float = 2.0,
) -> RunResult:
    """Submit and wait; the result's ``completed`` tells success, ``log`` holds the run log of a failure."""
    run_id = submit_run(app_dir, connection, run_config=run_config)
    return wait_for_run(connection, run_id, timeout=timeout, poll_interval=poll_interval)


def run_log(connection: FlwrConnection, run_id: int) -> str:
    """The run's log as the SuperLink stored it (ServerApp output); empty if Flower returns nothing."""
    done = connection.run_cli(["log", str(run_id), connection.name, "--show"])
    return strip_ansi(done.stdout)


def _result(connection: FlwrConnection, run_id: int, record: Mapping[str, Any]) -> RunResult:
    status = str(record.get("status", ""))
    details = str(record.get("status-details", ""))
    log = "" if status == FINISHED_COMPLETED else run_log(connection, run_id)
    elapsed = record.get("elapsed", 0.0)
    return RunResult(
        run_id=run_id,
        status=status,
        details=details,
        elapsed_s=float(elapsed) if isinstance(elapsed, (int, float)) else 0.0,
        record=dict(record),
        log=log,
    )


def _check_run_config_keys(app_dir: Path, run_config: Mapping[str, TomlValue]) -> None:
    """Name the unknown key ourselves: Flower 1.39 only says "[code: 15] Invalid run configuration."."""
    try:
        with (app_dir / "pyproject.toml").open("rb") as fh:
            known = tomllib.load(fh).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {})
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise DeploymentError(f"Cannot read {app_dir / 'pyproject.toml'} ({err}); fix the app's pyproject.") from err
    unknown = sorted(set(run_config) - set(known))
    if unknown:
        raise DeploymentError(
            f"Run config keys {unknown} are not in [tool.flwr.app.config] of {app_dir / 'pyproject.toml'} "
            f"(known: {sorted(known)}); Flower accepts overrides only for keys declared there."
        )


def _overrides_path(connection: FlwrConnection) -> Path:
    # Flower reads a --run-config value that ends in .toml as a file (flwr.common.config.parse_config_args).
    return connection.flwr_home / f"run-config-{time.time_ns()}.toml"


def stop_run(connection: FlwrConnection, run_id: int, *, timeout: float = 30.0) -> None:
    """``flwr stop`` the run: the ServerApp ends and the run becomes ``finished:stopped``. Best effort, never
    raises. One Control API request in this process; the ``flwr`` command only if Flower's modules moved."""
    try:
        from fedshield.flower_internals.control import stop_run as control_stop_run

        control_stop_run(connection.address, root_certificates=connection.root_certificates, run_id=run_id)
        return
    except ImportError:
        pass
    except Exception:  # noqa: BLE001  the SuperLink is down or the run already ended: nothing left to stop
        return
    try:
        connection.run_cli(["stop", str(run_id), connection.name], timeout=timeout)
    except DeploymentError:
        pass
