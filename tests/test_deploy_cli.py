"""``fedshield server`` / ``fedshield client`` without a federation: the packaged app's run config, the client's
downgrade guard, and every bad server input that must fail *before* a Flower process starts (one line, exit code
2). The client's bad input: ``tests/test_deploy_cli_client.py``.

The real-process runs are in ``tests/test_deploy_e2e.py``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from fedshield.cli import cli
from fedshield.client.app import PLAIN_REFUSAL, PLAIN_REFUSED_CODE, refuse_plain_updates
from fedshield.config import RunConfig
from fedshield.crypto import KeySet, init_keys
from fedshield.deploy import free_port
from fedshield.deploy.coordinator import app_dir, flower_run_config, prepare_app
from fedshield.server.app import RESUME_KEY, read_run_config
from _deploy_cli_inputs import ROOT, one_error_line, runner
from _deploy_cli_inputs import keys  # noqa: F401  (module-scoped pytest fixtures)


# ------------------------------------------------------------------------------------------------ packaged app


def test_packaged_app_declares_every_run_config_key_with_its_default() -> None:
    """Flower accepts overrides only for declared keys: a RunConfig field missing here could never be set."""
    with (app_dir() / "pyproject.toml").open("rb") as fh:
        app = tomllib.load(fh)["tool"]["flwr"]["app"]
    declared = app["config"]
    expected = flower_run_config(RunConfig())
    fields = {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)}
    assert set(expected) == fields - {"strategy-params"}  # a table with per-strategy keys: see prepare_app
    assert declared.pop(RESUME_KEY) is False, "the resume switch is declared, off by default"
    assert set(declared) == set(expected), "fedshield/flower_app/pyproject.toml is out of sync with RunConfig"
    for key, value in expected.items():
        if key != "out":  # made absolute when submitted
            assert declared[key] == value and type(declared[key]) is type(value), key
    assert app["components"] == {"serverapp": "fedshield.server.app:app", "clientapp": "fedshield.client.app:app"}


def test_the_app_directory_ships_in_the_package() -> None:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        package_data = tomllib.load(fh)["tool"]["setuptools"]["package-data"]["fedshield"]
    assert "flower_app/pyproject.toml" in package_data
    assert sorted(p.name for p in app_dir().iterdir() if p.name != "__pycache__") == ["pyproject.toml"]


def test_run_config_survives_the_trip_through_flower(tmp_path: Path) -> None:
    """What the ServerApp reads (Flower flattens the app's tables to dotted keys) is the config we sent."""
    from flwr.common.config import flatten_dict

    config = RunConfig(num_clients=3, num_rounds=2, epsilon=None, noise_multiplier=1.3, sample_rate=0.25,
                       secagg=False, out=Path("relative/run"), strategy="fedavgm",
                       strategy_params={"server-momentum": 0.5})
    sent = flower_run_config(config)
    assert sent["epsilon"] == 0.0 and Path(str(sent["out"])).is_absolute()
    app = prepare_app(config, tmp_path / "app")
    with (app / "pyproject.toml").open("rb") as fh:
        declared = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert declared["strategy-params"] == {"server_momentum": 0.5}
    seen_by_server_app = {**flatten_dict(declared), **sent}
    back, resume = read_run_config(seen_by_server_app)
    assert back == config.replace(out=Path(str(sent["out"]))) and resume is False
    assert read_run_config({**seen_by_server_app, RESUME_KEY: True}) == (back, True)


# ------------------------------------------------------------------------------------------------ downgrade guard


def _train_message(*, secagg: bool) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    if secagg:
        content[RECORD_KEY_CONFIGS] = ConfigRecord({"stage": "setup"})
    return Message(content=content, dst_node_id=1, message_type="train")


def _context(node_config: dict[str, bool | float | int | str]) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(
    ("node_config", "secagg", "passes"),
    [
        ({"data-path": "/d.csv", "state-dir": "/s"}, False, False),  # deployed, plain round: refused
        ({"data-path": "/d.csv", "state-dir": "/s", "allow-plain-updates": True}, False, True),
        ({"data-path": "/d.csv", "state-dir": "/s", "allow-plain-updates": False}, False, False),
        ({"data-path": "/d.csv", "state-dir": "/s"}, True, True),  # SecAgg+ round: goes on to the mod
        ({"partition-id": 0, "num-partitions": 2}, False, True),  # simulation: unaffected
    ],
)
def test_a_deployed_client_refuses_plain_updates_unless_allowed(
    node_config: dict[str, bool | float | int | str], secagg: bool, passes: bool
) -> None:
    msg = _train_message(secagg=secagg)
    calls: list[Message] = []

    def call_next(m: Message, c: Context) -> Message:
        calls.append(m)
        return Message(RecordDict(), reply_to=m)

    reply = refuse_plain_updates(msg, _context(node_config), call_next)
    assert bool(calls) is passes
    if not passes:
        assert reply.has_error() and reply.error.code == PLAIN_REFUSED_CODE
        assert reply.error.reason.startswith(PLAIN_REFUSAL)
        assert "--allow-plain-updates" in reply.error.reason and "--no-secagg" in reply.error.reason


# ------------------------------------------------------------------------------------------------ server bad input


def _server(tmp_path: Path, *args: str) -> list[str]:
    return ["server", "--address", f"127.0.0.1:{free_port()}", "--control-port", str(free_port()),
            "--out", str(tmp_path / "run"), "--rounds", "1", "--min-clients", "2", *args]


def _swap_in_foreign_server_cert(keys: KeySet, tmp_path: Path) -> Path:
    other = init_keys(tmp_path / "other", server_hosts=["127.0.0.1"], nodes=0)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in keys.directory.iterdir():
        (mixed / f.name).write_bytes(f.read_bytes())
        os.chmod(mixed / f.name, f.stat().st_mode)
    for name in ("server.pem", "server.key"):
        (mixed / name).write_bytes((other.directory / name).read_bytes())
        os.chmod(mixed / name, 0o600)
    return mixed


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no-keys", "--keys is required"),
        ("missing-dir", "does not exist; create one with `fedshield keys init"),
        ("foreign-cert", "not signed by"),
        ("one-client-secagg", "secure aggregation needs at least 2 clients"),
        ("fleet-port-busy", "already in use"),
        ("same-ports", "the SuperLink needs two ports"),
    ],
)
def test_server_bad_input_is_one_line_and_exit_2(keys: KeySet, tmp_path: Path, case: str, expected: str) -> None:
    good = ["--keys", str(keys.directory)]
    with socket.create_server(("127.0.0.1", 0)) as busy:
        if case == "no-keys":
            args = _server(tmp_path)
        elif case == "missing-dir":
            args = _server(tmp_path, "--keys", str(tmp_path / "nope"))
        elif case == "foreign-cert":
            args = _server(tmp_path, "--keys", str(_swap_in_foreign_server_cert(keys, tmp_path)))
        elif case == "one-client-secagg":
            args = _server(tmp_path, *good, "--min-clients", "1")
        elif case == "fleet-port-busy":
            args = _server(tmp_path, *good, "--address", f"127.0.0.1:{busy.getsockname()[1]}")
        else:
            args = _server(tmp_path, *good, "--address", "127.0.0.1:9555", "--control-port", "9555")
        result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert expected in one_error_line(result.output)
    assert not (tmp_path / "run" / "superlink" / "superlink.log").exists(), "nothing may start on bad input"


def test_server_refuses_a_foreign_directory_as_out(keys: KeySet, tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep")
    result = runner.invoke(cli, _server(tmp_path, "--keys", str(keys.directory)))
    assert result.exit_code == 2 and "not a fedshield run directory" in one_error_line(result.output)


def test_server_bad_input_in_a_real_process(keys: KeySet, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "fedshield", "server", "--keys", str(keys.directory), "--address",
             f"127.0.0.1:{port}", "--control-port", str(free_port()), "--out", str(tmp_path / "run")],
            capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: Port {port} on 127.0.0.1 is already in use")


