"""A site's private runtime directories (zygote socket, worker socket, ``flwr-clientapp`` shim) do not pile up in
the temp dir when its processes are SIGKILLed: the next one created sweeps those whose process is gone, and never
touches a live process's, another user's, or anything reached through a symlink. Real processes, real SIGKILL."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedshield.runtime_dirs import private_runtime_dir, sweep_dead

PREFIX = "fedshield-test-rt-"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_process_directory_is_swept_and_a_live_one_kept(tmp_path: Path) -> None:
    dead = tmp_path / f"{PREFIX}{_dead_pid()}-abc"
    live = tmp_path / f"{PREFIX}{os.getpid()}-def"
    legacy = tmp_path / f"{PREFIX}xyz123"  # an older version's name: no PID, left alone
    for directory in (dead, live, legacy):
        directory.mkdir(mode=0o700)
        (directory / "worker.sock").write_text("")
    assert sweep_dead(PREFIX, tmp_path) == [dead]
    assert not dead.exists() and live.exists() and legacy.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory owned by another user needs root")
def test_another_users_directory_and_a_symlink_are_never_removed(tmp_path: Path) -> None:
    pid = _dead_pid()
    theirs = tmp_path / f"{PREFIX}{pid}-theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)  # nobody's
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data").write_text("keep")
    (tmp_path / f"{PREFIX}{pid}-link").symlink_to(target)
    assert sweep_dead(PREFIX, tmp_path) == []
    assert theirs.exists() and (target / "data").read_text() == "keep"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir short enough for a Unix socket two levels down (pytest's ``tmp_path`` is not)."""
    path = Path(tempfile.mkdtemp(prefix="fsrt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_sigkilled_zygote_and_supernode_leave_a_directory_the_next_start_removes(short_tmp: Path) -> None:
    """The real :class:`Zygote` in a real process that forks its server, both SIGKILLed (no clean-up runs): the
    directory stays until the next site process creates one, which removes it."""
    tmp_path = short_tmp
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    script = textwrap.dedent("""
        import os, sys, time
        from fedshield.deploy.clientapp_zygote import Zygote
        zygote = Zygote(entry=None)
        parent = os.getpid()
        child = os.fork()
        if child == 0:
            zygote.serve(parent)
        while not os.path.exists(zygote.socket_path):
            if os.waitpid(child, os.WNOHANG)[0]:
                sys.exit("the zygote exited before it listened")
            time.sleep(0.01)
        print(child, zygote.directory, flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the site process failed before its zygote listened"
        child, directory = line.split()
        os.kill(int(child), signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    left = Path(directory)
    assert left.parent == tmp_path and (left / "zygote.sock").exists(), "SIGKILL runs no clean-up"
    code = "from fedshield.runtime_dirs import private_runtime_dir; print(private_runtime_dir('fedshield-zygote-'))"
    fresh = Path(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout.strip())
    assert not left.exists(), "the next start sweeps the dead site's directory"
    assert fresh.exists() and fresh.stat().st_mode & 0o777 == 0o700
    fresh.rmdir()  # its owner (that short process) is gone too: the next sweep would take it


def test_the_owner_pid_is_in_the_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    made = private_runtime_dir(PREFIX, owner_pid=4242)
    assert made.parent == tmp_path and made.name.startswith(f"{PREFIX}4242-")
    made.rmdir()


def test_a_socket_directory_moves_to_tmp_when_tmpdir_is_too_deep(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / ("d" * 90)
    deep.mkdir()
    monkeypatch.setenv("TMPDIR", str(deep))
    monkeypatch.setattr("tempfile.tempdir", None)
    made = private_runtime_dir(PREFIX, socket_name="zygote.sock")
    try:
        assert made.parent == Path("/tmp") and len(str(made / "zygote.sock")) <= 100
    finally:
        made.rmdir()
