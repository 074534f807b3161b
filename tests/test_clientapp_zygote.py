"""The ClientApp zygote: the ``flwr-clientapp`` shim hands its arguments, environment, working directory and
standard streams to a pre-imported parent, which forks the process that runs; the shim lives as long as that
process and exits with its code. Real fork, real Unix socket, real processes."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _processes import alive

from fedshield.deploy.clientapp_zygote import ZYGOTE_ENV, Zygote, write_shim

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote forks and passes fds: Linux only"),
    pytest.mark.usefixtures("no_leftover_processes"),
]


def _report() -> None:
    """The entry a forked child runs instead of Flower's: say who and where it is, then exit 7 (or sleep)."""
    print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(), "ppid": os.getppid(),
                      "marker": os.environ.get("MARKER")}), flush=True)
    if "--sleep" in sys.argv:
        time.sleep(60)
    raise SystemExit(7)


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[tuple[Zygote, int, Path]]:
    real = tmp_path / "real-clientapp"
    real.write_text(f"#!{sys.executable}\nimport sys; print('cold', *sys.argv[1:]); sys.exit(3)\n")
    real.chmod(0o700)
    zyg = Zygote(entry=_report)
    shim = write_shim(zyg.bin, str(real))
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        zyg.serve(parent)  # never returns
    deadline = time.monotonic() + 10
    while not Path(zyg.socket_path).exists():
        assert time.monotonic() < deadline, "the zygote never listened"
        time.sleep(0.02)
    try:
        yield zyg, pid, shim
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
    assert not zyg.directory.exists(), "the zygote removes its socket and shim when it exits"


def _env(zyg: Zygote) -> dict[str, str]:
    return {**os.environ, ZYGOTE_ENV: zyg.socket_path, "MARKER": "from-the-shim"}


def test_the_shim_runs_a_forked_child_with_its_own_argv_env_cwd_and_streams(
    zygote: tuple[Zygote, int, Path], tmp_path: Path
) -> None:
    zyg, zygote_pid, shim = zygote
    out = subprocess.run([str(shim), "--token", "abc"], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                         env=_env(zyg))
    assert out.returncode == 7, out
    seen = json.loads(out.stdout)
    assert seen["argv"][1:] == ["--token", "abc"] and seen["marker"] == "from-the-shim"
    assert Path(seen["cwd"]) == tmp_path
    assert seen["ppid"] == zygote_pid, "the child was forked by the zygote, not started cold"


def test_killing_the_shim_kills_its_child(zygote: tuple[Zygote, int, Path], tmp_path: Path) -> None:
    zyg, _, shim = zygote
    proc = subprocess.Popen([str(shim), "--sleep"], stdout=subprocess.PIPE, text=True, env=_env(zyg))
    assert proc.stdout is not None
    child = json.loads(proc.stdout.readline())["pid"]
    proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close()
    deadline = time.monotonic() + 10
    while alive(child):
        assert time.monotonic() < deadline, "the forked child outlived its shim"
        time.sleep(0.05)


def test_without_a_zygote_the_shim_starts_the_real_clientapp(zygote: tuple[Zygote, int, Path], tmp_path: Path) -> None:
    zyg, _, shim = zygote
    for env in ({**os.environ, ZYGOTE_ENV: ""}, {**os.environ, ZYGOTE_ENV: str(tmp_path / "gone.sock")}):
        out = subprocess.run([str(shim), "--token", "x"], capture_output=True, text=True, timeout=60, env=env)
        assert (out.returncode, out.stdout.strip()) == (3, "cold --token x"), out



_LEFT_TO_IMPORT = """
import sys
from fedshield.deploy.supernode_main import preload_clientapp_modules
preload_clientapp_modules()
before = set(sys.modules)
# What a ClientApp process does first (flwr.supernode.runtime.run_clientapp): build Flower's HTTP client to its
# SuperNode (nothing listens on port 9: no request is made), then read its FAB (a zip)
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
client = RuntimeHttpClient.from_server_address(
    server_address="127.0.0.1:9", insecure=True, root_certificates=None,
    interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor("t")],
    retry_invoker=make_simple_http_retry_invoker())
client.close()
import io, zipfile
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w") as z:
    z.writestr("pyproject.toml", "")
zipfile.ZipFile(buf).namelist()
print(sorted(m for m in set(sys.modules) - before if not m.startswith("flwr.supercore.interceptors")))
"""


def test_a_forked_clientapp_finds_flowers_http_client_already_imported() -> None:
    """Each ClientApp process used to import httpcore and h11 itself (0.2 s per message, measured): the zygote's
    preload now leaves Flower's HTTP client and the FAB's zip nothing to import. Real interpreter, no mocks."""
    out = subprocess.run([sys.executable, "-c", _LEFT_TO_IMPORT], capture_output=True, text=True, timeout=120,
                         check=True)
    left = ast.literal_eval(out.stdout.strip().splitlines()[-1])  # a printed list of module names
    assert not [m for m in left if m.split(".")[0] in ("httpcore", "h11", "httpx", "encodings")], left
