"""``--task text``: MiniLM + LoRA fine-tuned with DP-SGD and SecAgg+, in simulation and with real client processes.

Only the LoRA adapters and the head travel (test: bytes per site and the saved model's keys); the epsilon in
privacy.json recomputes from the mechanism written beside it. Data: small synthetic, separable sentences written
here; short sequences (16 tokens) keep the runs to a few minutes on two loaded cores.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import _sim_batch as sim_batch
from _processes import Cli
from safetensors.numpy import load_file

from fedshield.config import RunConfig
from fedshield.crypto import init_keys
from fedshield.data.task_files import read_task_file
from fedshield.deploy import free_port
from fedshield.errors import DataError
from fedshield.server.report import recompute_epsilon
from fedshield.tasks import get_task
from fedshield.tasks.partial import frozen_digest, travelling_keys

TASK = "text-2-16"
FULL_MINILM_PARAMS = 22_565_376  # MiniLM-L6 without its pooler (22.7M with it): the encoder every party builds
_POS = ["great", "wonderful", "excellent", "lovely", "fantastic", "superb"]
_NEG = ["terrible", "awful", "horrible", "dreadful", "bad", "poor"]
_THINGS = ["film", "meal", "service", "book", "hotel", "concert"]


def write_reviews(path: Path, n: int, seed: int = 0) -> Path:
    """A CSV as a site exports it: an id, the text, the label, in columns not named text/label."""
    rng = random.Random(seed)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "review", "sentiment"])
        for i in range(n):
            y = i % 2
            writer.writerow([i, f"the {rng.choice(_THINGS)} was {rng.choice(_POS if y else _NEG)}", y])
    return path


def test_reader_names_the_column_row_and_fix(tmp_path: Path) -> None:
    task = get_task(TASK)
    good = write_reviews(tmp_path / "r.csv", 6)
    data = read_task_file(task, good, text_column="review", label_column="sentiment")
    assert data.x.shape == (6, 16) and str(data.x.dtype) == "int64" and list(data.y) == [0, 1, 0, 1, 0, 1]
    with pytest.raises(DataError, match=r"no column 'text'.*--text-column"):
        read_task_file(task, good, text_column=None, label_column="sentiment")
    (tmp_path / "e.csv").write_text("text,label\nfine,1\n,0\n")
    with pytest.raises(DataError, match=r"empty in row 1 \(line 3\)"):
        read_task_file(task, tmp_path / "e.csv", text_column=None, label_column=None)
    (tmp_path / "l.csv").write_text("text,label\nfine,1\nbad,2\n")
    with pytest.raises(DataError, match=r"outside 0\.\.1"):
        read_task_file(task, tmp_path / "l.csv", text_column=None, label_column=None)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["a fine day", "a bad day"], "label": [1, 0]}), tmp_path / "t.parquet")
    assert read_task_file(task, tmp_path / "t.parquet", text_column=None, label_column=None).x.shape == (2, 16)


def test_only_lora_adapters_and_head_are_trainable_and_the_base_is_the_same_everywhere() -> None:
    task = get_task(TASK)
    model = task.new_model(0)
    keys = travelling_keys(model)
    assert keys and all(".lora_A." in k or ".lora_B." in k or k.startswith("head.") for k in keys)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for p in model.parameters()) - trainable == FULL_MINILM_PARAMS
    assert trainable / FULL_MINILM_PARAMS < 0.02  # the goal: LoRA bytes <= 2% of full fine-tuning
    assert frozen_digest(model) == frozen_digest(task.new_model(1))  # the pretrained base does not depend on seeds


SIM_CLIENTS = 3
sim_batch.register(
    "text_task", lambda root: RunConfig(task=TASK, data=str(root / "reviews.csv"), text_column="review",
                                        label_column="sentiment", num_clients=SIM_CLIENTS, num_rounds=1,
                                        local_epochs=1, lr=0.5, sample_rate=0.5, grad_sample_mode="hooks",
                                        secagg=True, epsilon=8.0, out=root / "text"),
    clients=SIM_CLIENTS, files=lambda root: write_reviews(root / "reviews.csv", 160),
)  # in the shared simulation of the other 3-client tests (one Ray start)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> sim_batch.Batch:
    return sim_batch.results(tmp_path_factory, clients=SIM_CLIENTS)


@sim_batch.TIMEOUT
def test_simulated_federation_fine_tunes_minilm_lora_with_dp_and_secagg(batch: sim_batch.Batch) -> None:
    config = batch.config("text_task")
    rows = [json.loads(line) for line in (config.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["clients_trained"] for r in rows] == [SIM_CLIENTS], rows
    lora_bytes = sum(v.nbytes for v in load_file(str(config.out / "model.safetensors")).values())
    # Masked values travel as uint32, like the float32 weights: the upload is the adapters and head, plus framing.
    assert all(r["bytes_up_per_client"] < 1.2 * lora_bytes for r in rows), (rows, lora_bytes)
    assert all(r["bytes_up_per_client"] <= 0.02 * 4 * FULL_MINILM_PARAMS for r in rows)
    saved = load_file(str(config.out / "model.safetensors"))
    assert all(".lora_" in k or k.startswith("head.") for k in saved)
    privacy = json.loads((config.out / "privacy.json").read_text())
    assert privacy["dp"] is True and len(privacy["clients"]) == SIM_CLIENTS
    for entry in privacy["clients"].values():
        assert entry["epsilon"] == pytest.approx(recompute_epsilon(entry), rel=1e-9)
        assert 0 < entry["epsilon"] <= 8.0 + 1e-6
    # Separable sentences: one private round already lifts the server's test accuracy well above chance (0.94
    # here); a band, not a figure: the upper end stays open since the data are easy.
    assert rows[-1]["accuracy"] > 0.6, rows


@pytest.mark.usefixtures("no_leftover_processes")
@pytest.mark.timeout(900)  # 89 s on a quiet 2-core machine (zygote on), 550 s once at load 30
def test_two_real_clients_fine_tune_minilm_lora_with_dp_and_secagg(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "keys", server_hosts=["127.0.0.1"], nodes=2)
    sites = [write_reviews(tmp_path / f"site-{i}.csv", 24, seed=i) for i in (1, 2)]
    fleet, out = f"127.0.0.1:{free_port()}", tmp_path / "run"
    started: list[Cli] = []
    try:
        server = Cli.start(["server", "--keys", str(keys.directory), "--address", fleet, "--control-port",
                            str(free_port()), "--rounds", "1", "--min-clients", "2", "--out", str(out), "--task", TASK,
                            "--grad-sample-mode", "hooks", "--lr", "0.5", "--local-epochs", "1"],
                           tmp_path / "server.out")
        started.append(server)
        server.wait_for(r"registered nodes: node-1, node-2", timeout=180)
        for i, data in enumerate(sites, 1):
            started.append(Cli.start(
                ["client", "--server", fleet, "--ca", str(keys.ca_cert), "--node-key",
                 str(keys.node(f"node-{i}").private_key_path), "--roster", str(keys.authorized_nodes),
                 "--secagg-min-peers", "1", "--task", TASK, "--text-column", "review", "--label-column",
                 "sentiment", "--data", str(data), "--state", str(tmp_path / f"state-{i}")],
                tmp_path / f"client-{i}.out"))
        assert server.proc.wait(timeout=900) == 0, server.text()
    finally:
        for cli in started:
            cli.interrupt()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["clients_trained"] == 2, rows
    saved = load_file(str(out / "model.safetensors"))
    assert saved and all(".lora_" in k or k.startswith("head.") for k in saved)
    assert rows[-1]["bytes_up_per_client"] < 1.2 * sum(v.nbytes for v in saved.values())
    privacy = json.loads((out / "privacy.json").read_text())
    for entry in privacy["clients"].values():
        assert entry["epsilon"] == pytest.approx(recompute_epsilon(entry), rel=1e-9)


def test_a_site_checks_its_text_file_and_names_its_columns_to_the_clientapp(tmp_path: Path) -> None:
    from fedshield.deploy.site import ClientOptions, check_client
    from fedshield.client.node_config import LABEL_COLUMN, TEXT_COLUMN

    data = write_reviews(tmp_path / "site.csv", 24)
    options = ClientOptions(server="127.0.0.1:9092", data=data, state_dir=tmp_path / "state", task=TASK,
                            insecure=True, text_column="review", label_column="sentiment")
    check = check_client(options)
    assert check.train_examples + check.test_examples == 24
    assert check.node_config[TEXT_COLUMN] == "review" and check.node_config[LABEL_COLUMN] == "sentiment"
    with pytest.raises(DataError, match="--text-column"):
        check_client(ClientOptions(server="127.0.0.1:9092", data=data, state_dir=tmp_path / "s2", task=TASK,
                                   insecure=True, label_column="sentiment"))


_DEVICES = [pytest.param("cpu", False, "hooks", id="cpu-hooks"),
            pytest.param("cpu", False, "ghost", id="cpu-ghost"),  # the run default
            pytest.param("cuda", True, "hooks", id="cuda-bf16", marks=pytest.mark.skipif(
                not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)"))]


@pytest.mark.parametrize(("device", "amp", "mode"), _DEVICES)
def test_dp_sgd_on_minilm_lora_moves_only_adapters_and_head(tmp_path: Path, device: str, amp: bool, mode: str) -> None:
    from fedshield.privacy.dpsgd import train_dp_sgd
    from fedshield.training import make_generator

    task = get_task(TASK)
    model = task.new_model(0)
    before_digest = frozen_digest(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if k in set(travelling_keys(model))}
    data = read_task_file(task, write_reviews(tmp_path / "r.csv", 16), text_column="review", label_column="sentiment")
    result = train_dp_sgd(model, data, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, epochs=1, lr=0.5,
                          loss_fn=task.loss_fn(), generator=make_generator(0), grad_sample_mode=mode,
                          device=device, amp=amp)
    assert result.history == ((1.0, 0.5, 2),)
    model.to("cpu")
    assert frozen_digest(model) == before_digest  # DP-SGD never touched the pretrained base
    after = model.state_dict()
    assert all(not after[k].equal(v) for k, v in before.items() if ".lora_B." in k or k.startswith("head."))
