"""Bad input to ``fedshield simulate``: a one-line error naming the problem and the fix, exit code 2, and nothing
written. Valid settings are checked before Ray starts, so these run in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedshield.cli import cli
from fedshield.config import PartitionSpec, RunConfig, load_config_file
from fedshield.errors import ConfigError

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--task", "mnist"], "unknown task 'mnist': choose one of digits, breast-cancer"),
        (["--partition", "zipf:2"], "unknown partition 'zipf:2'"),
        (["--partition", "dirichlet"], "needs an argument"),
        (["--partition", "dirichlet:-1"], "alpha must be > 0"),
        (["--epsilon", "0"], "epsilon must be a finite number > 0"),
        (["--epsilon", "-3"], "epsilon must be a finite number > 0"),
        (["--noise-multiplier", "0"], "noise multiplier 0 with DP on has an infinite epsilon"),
        (["--delta", "1.5"], "delta must be in (0, 1)"),
        (["--delta", "0"], "delta must be in (0, 1)"),
        (["--clients", "5000"], "5000 clients need at least"),
        (["--sample-rate", "0.3"], "is not 1/k"),
        (["--accountant", "gdp"], "unknown accountant 'gdp'"),
        (["--rounds", "0"], "rounds must be a whole number >= 1"),
        (["--quantize", "4", "--no-secagg"], "quantize must be 8 or 16"),
        (["--quantize", "8", "--client-dp", "distributed", "--client-clip-norm", "1", "--client-noise-multiplier",
          "1"], "use --quantize 16, or drop --quantize"),
    ],
)
def test_bad_input_one_line_error_exit_2(tmp_path: Path, args: list[str], expected: str) -> None:
    out = tmp_path / "run"
    result = runner.invoke(cli, ["simulate", "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert not out.exists(), "a failed start must not leave a half-written run directory"


@pytest.mark.parametrize("command", ["simulate", "server"])
@pytest.mark.parametrize(("args", "expected"), [
    (["--fraction-evaluate", "2"], "fraction-evaluate must be in [0, 1]"),
    (["--fraction-train", "0"], "fraction-train must be in (0, 1]"),
    (["--round-timeout", "-1"], "round-timeout"),
    (["--secagg-shares", "2"], "secagg-shares must be a fraction in (0, 1] or a whole count >= 3"),
    (["--epsilon", "0"], "epsilon must be a finite number > 0"),
    (["--strategy", "nope"], "unknown strategy 'nope'"),
    (["--quantize", "3"], "quantize must be 8 or 16"),
    (["--client-dp", "maybe"], "unknown client-dp mode 'maybe'"),
    (["--node-wait-timeout", "0"], "node-wait-timeout must be a finite number of seconds > 0"),
])
def test_shared_flags_reach_the_run_config_of_both_commands(tmp_path: Path, command: str, args: list[str],
                                                             expected: str) -> None:
    """simulate and server declare these flags once (cli/_options.py): each must reach RunConfig's checks."""
    out = tmp_path / "run"
    result = runner.invoke(cli, [command, "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert not out.exists()


def test_unwritable_out_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root ignores permission bits: use a path under a regular file instead
        target = tmp_path / "a-file"
        target.write_text("x")
        out = target / "run"
    else:
        out = locked / "run"
    result = runner.invoke(cli, ["simulate", "--out", str(out)])
    assert result.exit_code == 2
    assert "cannot write the run directory" in result.output


def test_foreign_out_directory_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = runner.invoke(cli, ["simulate", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "not a fedshield run directory" in result.output
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_real_process_exit_code_and_single_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedshield", "simulate", "--epsilon", "0", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: epsilon must be a finite number > 0, got 0.0: e.g. --epsilon 8"
    ]


def test_a_run_without_verbose_prints_no_flower_log(tmp_path: Path) -> None:
    """Flower's logger module sets itself to DEBUG when first imported, after the CLI set it to ERROR: a default
    run printed Flower's whole log (669 lines for the README's job). Real process, real simulation."""
    proc = subprocess.run(
        [sys.executable, "-m", "fedshield", "simulate", "--clients", "3", "--rounds", "1", "--no-dp", "--no-secagg",
         "--local-epochs", "1", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "round   1/1" in output
    flower = [line for line in output.splitlines()
              if "flwr" in line or line.lstrip("\x1b[0123456789m").startswith(("INFO", "DEBUG"))]
    assert flower == [], flower[:5]


def test_config_file_keys_and_flag_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('[fedshield]\nclients = 7\nrounds = 3\npartition = "dirichlet:0.5"\nepsilon = 3.0\n')
    loaded = load_config_file(cfg)
    assert (loaded.num_clients, loaded.num_rounds, loaded.partition, loaded.epsilon) == (7, 3, PartitionSpec("dirichlet", 0.5), 3.0)
    from fedshield.cli.simulate import build_config

    assert build_config(cfg, {"num_rounds": 9, "epsilon": None}).num_rounds == 9
    cfg.write_text("[fedshield]\nepsilonn = 3\n")
    with pytest.raises(ConfigError, match="unknown setting 'epsilonn'"):
        load_config_file(cfg)
    cfg.write_text("[fedshield\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config_file(cfg)


def test_sample_rate_is_normalised_to_whole_steps() -> None:
    assert RunConfig(sample_rate=0.333333).steps_per_epoch == 3
    assert RunConfig(sample_rate=0.333333).sample_rate == 1 / 3



def test_the_built_in_task_names_the_server_skips_checking_are_the_registrys() -> None:
    """``fedshield server`` checks a task by building it, except a built-in name (known without torch)."""
    from fedshield.config.names import BUILTIN_TASKS
    from fedshield.tasks import TASKS

    assert set(BUILTIN_TASKS) == set(TASKS)
