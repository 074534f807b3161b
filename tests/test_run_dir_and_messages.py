"""Run directories are never silently overwritten, and operator messages name the real cause; through the real CLI.

Every refusal is one ``error:`` line with exit code 2, and leaves the run directory byte for byte as it was.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedshield.config import RunConfig
from fedshield.crypto import KeySet, init_keys
from fedshield.deploy import free_port
from fedshield.server.checkpoint import Checkpoint, save_checkpoint
from fedshield.server.run_dir import claim_run_dir


def _fedshield(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedshield", *args], capture_output=True, text=True, timeout=180,
                          check=False)


def _error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeySet:
    return init_keys(tmp_path_factory.mktemp("keys") / "keys", server_hosts=["127.0.0.1"], nodes=1)


def _run_dir(root: Path, *, ckpt_round: int = 1, ckpt_task: str = "digits", drop: str | None = None) -> Path:
    """A run directory as a run leaves it after round 1 of 3, with a checkpoint that can be made inconsistent."""
    out = root / "run"
    out.mkdir()
    config = RunConfig(num_rounds=3, out=out)
    (out / "config.json").write_text(json.dumps(config.to_flat_dict()))
    (out / "metrics.jsonl").write_text(json.dumps({"round": 1}) + "\n")
    ckpt_config = {**config.to_flat_dict(), "task": ckpt_task}
    save_checkpoint(out, Checkpoint(server_round=ckpt_round, run_id="r1", noise_multiplier=1.0,
                                    model={"w": np.zeros(3, dtype=np.float32)}, rounds=[{"round": 1}] * max(ckpt_round, 0),
                                    config=ckpt_config))
    if drop is not None:  # a hand-edited manifest: one key removed
        from safetensors.numpy import load, save

        raw = (out / "checkpoint.safetensors").read_bytes()
        n = int.from_bytes(raw[:8], "little")
        manifest = json.loads(json.loads(raw[8:8 + n])["__metadata__"]["manifest"])
        del manifest[drop]
        (out / "checkpoint.safetensors").write_bytes(save(load(raw), metadata={"manifest": json.dumps(manifest)}))
    return out


@pytest.mark.parametrize("command", ["simulate", "server"])
def test_an_existing_run_needs_resume_or_force(tmp_path: Path, keys: KeySet, command: str) -> None:
    out = _run_dir(tmp_path)
    before = _snapshot(out)
    extra = ["--keys", str(keys.directory), "--address", f"127.0.0.1:{free_port()}",
             "--control-port", str(free_port())] if command == "server" else []
    line = _error(_fedshield(command, "--out", str(out), *extra))
    assert line == (f"error: --out {out} already holds a run (1 of 3 rounds done): continue it with --resume {out}, "
                    "replace it with --force, or choose another --out")
    assert _snapshot(out) == before
    both = _error(_fedshield(command, "--resume", str(out), "--force", *extra))
    assert "give one of them" in both and _snapshot(out) == before


def test_force_removes_the_old_run_only_after_the_input_is_valid(tmp_path: Path) -> None:
    out = _run_dir(tmp_path)
    before = _snapshot(out)
    _error(_fedshield("simulate", "--out", str(out), "--force", "--epsilon", "0"))
    assert _snapshot(out) == before  # bad input: nothing removed
    assert claim_run_dir(out, force=True) == out.resolve()
    assert _snapshot(out) == {}  # the old run's files went; the new run starts clean


@pytest.mark.parametrize(("case", "expected"), [
    ("other-task", "config.json and checkpoint.safetensors disagree on task"),
    ("negative-round", "incomplete manifest (ValueError: server_round -5 with 0 recorded rounds)"),
    ("no-rounds-key", "incomplete manifest (KeyError: 'rounds')"),
])
def test_resume_validates_the_checkpoint_against_config_json(tmp_path: Path, case: str, expected: str) -> None:
    out = _run_dir(tmp_path, ckpt_task="breast-cancer" if case == "other-task" else "digits",
                   ckpt_round=-5 if case == "negative-round" else 1, drop="rounds" if case == "no-rounds-key" else None)
    before = _snapshot(out)
    line = _error(_fedshield("simulate", "--resume", str(out)))
    assert expected in line, line
    assert _snapshot(out) == before


def test_an_unknown_task_fails_before_the_server_starts_anything(tmp_path: Path, keys: KeySet) -> None:
    out = tmp_path / "run"
    line = _error(_fedshield("server", "--keys", str(keys.directory), "--task", "no-such-task", "--out", str(out),
                             "--address", f"127.0.0.1:{free_port()}", "--control-port", str(free_port())))
    assert "unknown task 'no-such-task'" in line
    assert not out.exists()


def test_the_server_warns_about_private_keys_it_does_not_need(tmp_path: Path, keys: KeySet) -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:  # fails right after the warnings, before any process
        done = _fedshield("server", "--keys", str(keys.directory), "--out", str(tmp_path / "run"),
                          "--address", f"127.0.0.1:{busy.getsockname()[1]}", "--control-port", str(free_port()))
    _error(done)
    warning = " ".join(done.stdout.split())
    assert "holds private keys this server does not need: ca.key, node-1.key" in warning, done.stdout


def test_a_client_port_out_of_range_is_blamed_on_the_port(tmp_path: Path, keys: KeySet) -> None:
    line = _error(_fedshield("client", "--server", "127.0.0.1:9092", "--data", str(tmp_path / "x.csv"),
                             "--state", str(tmp_path / "state"), "--ca", str(keys.ca_cert),
                             "--node-key", str(keys.directory / "node-1.key"), "--port", "99999",
                             "--roster", str(keys.authorized_nodes)))
    assert "--port must be a TCP port in 1..65535 for this site's local SuperNode API, got 99999" in line


def test_reasons_from_sites_are_printed_without_control_characters() -> None:
    from fedshield.cli import server as deploy

    console = Console(record=True, width=400, force_terminal=True)
    original, deploy.console = deploy.console, console
    try:
        deploy._print_failures({"clients": {"node-\x1b]0;pwned\x07": {"failures": [
            {"round": 1, "reason": "fine\x1b[2J\x1b[31m RED\r\nforged line\x9b"}]}}})
    finally:
        deploy.console = original
    text = console.export_text(styles=False)
    assert "\x1b" not in text and "\r" not in text and "\x9b" not in text and "\x07" not in text
    assert "fine RED" in text and "forged line" in text and text.count("\n") == 1
