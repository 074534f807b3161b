"""The warm worker of ``fedshield client`` and the thin ClientApp that hands it the rounds.

Real parts throughout: a real Unix socket, the real trainer with real Opacus, a real ledger on disk. What the worker
returns must be what the ClientApp would have computed itself, refusals included, and the per-message ClientApp
process must not import torch, Opacus or the data stack.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedshield import protocol as P
from fedshield.client.node_config import ALLOW_NO_DP, BUDGET, DATA_PATH, LABEL_COLUMN, STATE_DIR, TASK
from fedshield.client.policy import POLICY_REFUSAL, POLICY_REFUSED_CODE
from fedshield.client.round_work import CONFIG_ERROR_CODE, REFUSAL_CODE, WORKER_ERROR_CODE, Refusal, run_evaluate, run_train
from fedshield.client.warm_worker import ClientWorker
from fedshield.client.warm_worker_wire import ProtocolViolation, read_frame, request_evaluate, request_train, write_frame
from fedshield.config import RoundSettings
from fedshield.privacy.ledger import LEDGER_FILE, PrivacyLedger
from fedshield.tasks import get_task


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """A deployed site's node config: a CSV of 120 breast-cancer records and a state directory."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()  # raw measurements, as a site exports them (the task preprocesses on load)
    rows = np.column_stack([data.data[:120], data.target[:120]])
    path = tmp_path / "site.csv"
    header = ",".join([f"f{i}" for i in range(data.data.shape[1])] + ["label"])
    np.savetxt(path, rows, delimiter=",", header=header, comments="")
    # Plain rounds train deterministically, which the comparisons below need: this site allows rounds without DP.
    return {DATA_PATH: str(path), STATE_DIR: str(tmp_path / "state"), LABEL_COLUMN: "", BUDGET: 0.0,
            TASK: "breast-cancer", ALLOW_NO_DP: True}


@pytest.fixture
def short_state() -> Iterator[Path]:
    """A state directory short enough to hold the worker's socket (pytest's ``tmp_path`` can pass 108 bytes)."""
    root = Path(tempfile.mkdtemp(prefix="fsw-"))
    yield root / "state"
    shutil.rmtree(root, ignore_errors=True)


def _config(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = dict(
        run_id="run", server_round=1, num_rounds=3, task="breast-cancer", partition="iid", seed=3, local_epochs=1,
        lr=0.5, sample_rate=1.0, dp=False, noise_multiplier=0.0, max_grad_norm=1.0, target_epsilon=0.0, delta=1e-5,
        accountant="prv", grad_sample_mode="hooks",
    )
    base.update(changes)
    return RoundSettings(**base).to_record_dict()


def _global(seed: int = 3) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in get_task("breast-cancer").new_model(seed).state_dict().items()}


def test_the_clientapp_module_imports_neither_torch_nor_opacus_nor_the_data_stack() -> None:
    code = "import sys, fedshield.client.app; print(sorted(m for m in ('torch', 'opacus', 'datasets', 'sklearn') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_a_round_through_the_worker_equals_the_same_round_in_process(site: dict[str, Any]) -> None:
    """Full-batch plain training is deterministic: the worker's weights and metrics equal in-process training."""
    config, weights = _config(), _global()
    local = run_train(site, config, weights)
    with ClientWorker(site) as worker:
        remote = request_train(worker.socket_path, config, weights)
        metrics = request_evaluate(worker.socket_path, config, remote.arrays)
    assert set(remote.arrays) == set(local.arrays) == set(weights)
    for key in weights:
        assert remote.arrays[key].dtype == local.arrays[key].dtype
        np.testing.assert_allclose(remote.arrays[key], local.arrays[key], rtol=0, atol=1e-6)
    assert max(float(np.abs(remote.arrays[k] - weights[k]).max()) for k in weights) > 1e-3, "nothing trained"
    assert remote.metrics == pytest.approx(local.metrics)
    assert metrics == pytest.approx(run_evaluate(site, config, remote.arrays))
    assert metrics[P.NUM_EXAMPLES] > 0 and 0.0 <= metrics[P.EVAL_ACCURACY] <= 1.0


def test_the_worker_charges_the_sites_ledger_and_relays_its_refusal(site: dict[str, Any]) -> None:
    """DP rounds are charged on the site's own ledger; past the site's cap the refusal reaches the ClientApp."""
    dp = dict(dp=True, noise_multiplier=1.0, sample_rate=0.5)
    with ClientWorker({**site, BUDGET: 8.0}) as worker:
        first = request_train(worker.socket_path, _config(**dp), _global())
        ledger = PrivacyLedger.load(Path(site[STATE_DIR]) / LEDGER_FILE)
        assert len(ledger.rounds) == 1 and ledger.epsilon == pytest.approx(first.metrics[P.EPSILON])
        with pytest.raises(Refusal) as refused:
            for server_round in range(2, 50):  # sigma 1, q 0.5: epsilon 4.9 after one round, so 8 is gone soon
                request_train(worker.socket_path, _config(server_round=server_round, **dp), _global())
    assert refused.value.code == REFUSAL_CODE and refused.value.reason.startswith(P.BUDGET_REFUSAL)
    after = PrivacyLedger.load(Path(site[STATE_DIR]) / LEDGER_FILE)
    assert after.epsilon <= 8.0 and after.exhausted, "the refusal is recorded and the cap held"


def test_a_bad_round_config_comes_back_as_a_configuration_refusal(site: dict[str, Any]) -> None:
    with ClientWorker(site) as worker:
        with pytest.raises(Refusal) as refused:
            request_train(worker.socket_path, {**_config(), "client-dp": "bogus"}, _global())
        assert refused.value.code == CONFIG_ERROR_CODE and "bogus" in refused.value.reason
        with pytest.raises(Refusal) as refused:  # another task than the site's own: refused before it is imported
            request_train(worker.socket_path, {**_config(), "task": "no-such-task"}, _global())
        assert refused.value.code == POLICY_REFUSED_CODE
        assert refused.value.reason.startswith(f"{POLICY_REFUSAL}: task:") and "no-such-task" in refused.value.reason
        request_train(worker.socket_path, _config(), _global())  # and it keeps serving


def test_a_vanished_worker_is_a_clear_refusal_naming_the_fix(tmp_path: Path) -> None:
    with pytest.raises(Refusal) as refused:
        request_train(str(tmp_path / "gone.sock"), _config(), _global())
    assert refused.value.code == WORKER_ERROR_CODE and "restart `fedshield client`" in refused.value.reason


def test_malformed_requests_are_dropped_and_the_worker_keeps_serving(site: dict[str, Any]) -> None:
    with ClientWorker(site) as worker:
        for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"FSW1" + (2**40).to_bytes(8, "big") + bytes(8), b"FSW1\x00"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(worker.socket_path)
                sock.sendall(garbage)
                sock.shutdown(socket.SHUT_WR)
                assert _closed_without_reply(sock), "a malformed request gets no reply"
        assert request_evaluate(worker.socket_path, _config(), _global())[P.NUM_EXAMPLES] > 0
        directory = Path(worker.socket_path).parent
        assert oct(directory.stat().st_mode & 0o777) == oct(0o700)
    assert not directory.exists(), "close() removes the socket and its directory"


def _closed_without_reply(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:  # closed with our bytes unread: also no reply
        return True


def test_frames_keep_any_key_and_shape_and_refuse_pickles() -> None:
    arrays = {"file": np.arange(3.0), "bn.num_batches_tracked": np.array(7), "w": np.zeros((2, 0), np.float32)}
    left, right = socket.socketpair()
    with left, right:
        write_frame(left, {"op": "x"}, arrays)
        header, back = read_frame(right)
        assert header == {"op": "x"} and list(back) == list(arrays)
        for key, value in arrays.items():
            assert back[key].dtype == value.dtype and back[key].shape == value.shape
            np.testing.assert_array_equal(back[key], value)
        import io

        buffer = io.BytesIO()
        np.savez(buffer, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
        body = buffer.getvalue()
        head = b'{"names": ["x"]}'
        left.sendall(b"FSW1" + len(head).to_bytes(8, "big") + len(body).to_bytes(8, "big") + head + body)
        with pytest.raises(ProtocolViolation, match="plain arrays"):
            read_frame(right)


def test_another_users_connection_is_refused(site: dict[str, Any]) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    # No state directory: the socket goes to a fresh directory under /tmp, which the other user can traverse to
    # (pytest's own temp root is 0700, so a socket under it would be unreachable and prove nothing).
    served_only = {k: v for k, v in site.items() if k != STATE_DIR}
    with ClientWorker(served_only) as worker:
        os.chmod(Path(worker.socket_path).parent, 0o755)  # let the other user reach the socket at all
        os.chmod(worker.socket_path, 0o777)
        code = "\n".join([
            "import os, socket",
            "os.setuid(65534)",
            "s = socket.socket(socket.AF_UNIX)",
            f"s.connect({worker.socket_path!r})",
            "try:",
            "    s.sendall(b'FSW1' + bytes(16)); print('reply' if s.recv(1) else 'closed')",
            "except (BrokenPipeError, ConnectionResetError):",
            "    print('closed')",
        ])
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "closed", out.stdout + out.stderr
        assert worker.served == 0


def test_the_socket_lives_in_the_state_directory_and_a_stale_one_is_replaced(
    site: dict[str, Any], short_state: Path
) -> None:
    """A client killed hard leaves its socket in its own state directory; the next start takes it over. A second
    live client on the same state directory is refused (it would charge the same ledger)."""
    from fedshield.errors import ConfigError

    site = {**site, STATE_DIR: str(short_state)}
    stale = Path(site[STATE_DIR]) / "worker" / "worker.sock"
    stale.parent.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()  # bound, never listening: what a SIGKILLed worker leaves
    with ClientWorker(site) as worker:
        assert worker.socket_path == str(stale)
        assert request_evaluate(worker.socket_path, _config(), _global())[P.NUM_EXAMPLES] > 0
        with pytest.raises(ConfigError, match="another fedshield client is serving this state directory"):
            ClientWorker(site).start()
    assert not stale.parent.exists(), "close() removes the socket and its directory"
