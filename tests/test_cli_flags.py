"""``fedshield simulate`` and ``fedshield server`` take the same run flags, defined once in ``cli/_options.py``;
the root ``pyproject.toml`` (read by ``flwr run .``) and the packaged app (submitted by ``fedshield server``) declare
the same run-config keys and defaults, which are RunConfig's."""

from __future__ import annotations

import dataclasses
import inspect
import tomllib
from collections import defaultdict
from pathlib import Path

from typer.main import get_command
from typer.testing import CliRunner

from fedshield.cli import _options as o
from fedshield.cli import cli
from fedshield.cli.server import server_command
from fedshield.cli.simulate import simulate_command
from fedshield.config import RunConfig
from fedshield.server.app import RESUME_KEY
from fedshield.deploy.coordinator import app_dir, flower_run_config

ROOT = Path(__file__).resolve().parents[1]

#: What each command has of its own (how many clients are made or awaited, Ray resources, keys and addresses).
OWN = {
    "simulate": {"clients", "backend", "ray_address", "cpus_per_client", "gpus_per_client", "dispatch", "data", "text_column", "label_column"},
    "server": {"keys", "address", "control_port", "min_clients", "insecure"},
}


def _params(command: object) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(command).parameters)  # type: ignore[arg-type]


def _option_names(name: str) -> dict[str, tuple[str, ...]]:
    click_command = get_command(cli).commands[name]  # type: ignore[attr-defined]
    return {p.name: tuple(p.opts) for p in click_command.params}


def test_both_commands_take_every_shared_run_flag_from_the_one_definition() -> None:
    simulate, server = _params(simulate_command), _params(server_command)
    assert set(simulate) - OWN["simulate"] == set(o.RUN_FLAGS)
    assert set(server) - OWN["server"] == set(o.RUN_FLAGS)
    for name in o.RUN_FLAGS:
        # The same Annotated object: one help text, one type, one flag name.
        assert simulate[name].annotation == server[name].annotation, name
        assert simulate[name].default == server[name].default, name


def test_the_shared_flags_have_the_same_spelling_on_the_command_line() -> None:
    simulate, server = _option_names("simulate"), _option_names("server")
    for name in o.RUN_FLAGS:
        assert simulate[name] == server[name], name
    assert "--strategy" in server["strategy"] and "--quantize" in server["quantize"]
    assert "--client-dp" in server["client_dp"] and "--partition" in server["partition"]


def test_every_run_config_setting_has_a_flag_or_is_said_to_have_none() -> None:
    """A RunConfig field with no flag can only be set from a config file: that must be a decision, not drift."""
    # num_clients: --clients / --min-clients; separate_evaluation: the rare wish for a federated evaluation of every
    # round's model, at one more message per round.
    file_only = {"num_clients", "strategy_params", "client_sampling", "separate_evaluation"}
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    flags = set(o.run_flags(defaultdict(lambda: None)))
    assert flags <= fields
    assert fields - flags == file_only


def test_server_refuses_partition_in_one_line_saying_why() -> None:
    result = CliRunner().invoke(cli, ["server", "--partition", "iid", "--insecure"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == ["error: --partition splits one dataset among simulated clients; in a deployment each site "
                     "brings its own data (fedshield client --data): drop --partition"]


def _app_config(path: Path) -> dict[str, object]:
    with path.open("rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_root_and_packaged_app_configs_are_equal_and_are_run_configs_keys() -> None:
    root, packaged = _app_config(ROOT / "pyproject.toml"), _app_config(app_dir() / "pyproject.toml")
    assert root == packaged, set(root) ^ set(packaged)
    expected = flower_run_config(RunConfig())
    assert set(packaged) == set(expected) | {RESUME_KEY}
    for key, value in expected.items():
        if key != "out":  # made absolute when submitted
            assert packaged[key] == value and type(packaged[key]) is type(value), key
