"""DP-SGD epoch and step time and peak memory per Opacus grad-sample mode, beside plain PyTorch, on the built-in
models, on the CPU or a CUDA GPU.

Each (task, mode) runs in a fresh subprocess so its peak memory is its own (host RSS; on CUDA also the GPU's peak
allocation); each repeats the epoch several times and the median is reported, with its ratio to plain PyTorch
measured in the same run and on the same device. Training goes through fedshield's own trainers with ``device=``,
so model, batches and noise live on that device exactly as on a client. Usage::

    python benchmarks/dpsgd_modes.py [--repeats 5] [--batch 256] [--device cpu|cuda|cuda:N] [--amp]
                                     [--tasks digits,breast-cancer] [--modes plain,hooks,functorch,ghost] [--json OUT]

``--json OUT`` writes rows ``{name, ours, baseline, unit, ratio, detail}``: each DP mode's epoch time and peak RSS
against plain PyTorch, and ghost clipping (fedshield's default) against hooks (Opacus' default).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODES = ("plain", "hooks", "functorch", "ghost")


def _worker(task_name: str, mode: str, repeats: int, batch: int, device_spec: str, amp: bool) -> dict[str, float]:
    import resource

    import numpy as np
    import torch
    from torch import nn

    from fedshield.dataspec import Dataset
    from fedshield.device import resolve_device
    from fedshield.privacy.dpsgd import train_dp_sgd
    from fedshield.training import make_generator, train_plain
    from fedshield.tasks import get_task

    torch.set_num_threads(1)
    device = resolve_device(device_spec)
    task = get_task(task_name)
    data = task.load_bundled()
    # Replicate the data set so one epoch is long enough to time (digits: 1,797 -> ~14k examples).
    reps = max(1, 14_000 // len(data))
    data = Dataset(np.concatenate([data.x] * reps), np.concatenate([data.y] * reps))
    q = batch / len(data)
    q = 1 / round(1 / q)
    steps = round(1 / q)
    times = []
    for r in range(repeats + 1):  # the first epoch warms up allocators and kernels; not counted
        model = task.new_model(0)
        _sync(device)
        start = time.perf_counter()
        if mode == "plain":
            train_plain(model, data, sample_rate=q, epochs=1, lr=0.1, loss_fn=nn.CrossEntropyLoss(),
                        generator=make_generator(r), device=device, amp=amp)
        else:
            train_dp_sgd(model, data, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q, epochs=1, lr=0.1,
                         loss_fn=nn.CrossEntropyLoss(), generator=make_generator(r), grad_sample_mode=mode,
                         device=device, amp=amp)
        _sync(device)
        if r:
            times.append(time.perf_counter() - start)
        if {p.device for p in model.parameters()} != {device}:
            raise RuntimeError(f"the model did not train on {device}")
    epoch = statistics.median(times)
    out = {"median_s": epoch, "step_ms": 1000 * epoch / steps, "examples": len(data),
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _sync(device) -> None:  # type: ignore[no-untyped-def]
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (modes that support it)")
    parser.add_argument("--tasks", default="digits,breast-cancer")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker[0], args.worker[1], args.repeats, args.batch, args.device, args.amp)))
        return
    from fedshield.config import AMP_GRAD_SAMPLE_MODES

    wanted = args.modes.split(",")
    if unknown := set(wanted) - set(MODES):
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {','.join(MODES)}")
    if "plain" not in wanted:
        wanted.append("plain")  # every ratio is to plain PyTorch, measured in the same run
    modes = [m for m in MODES if m in wanted and (not args.amp or m == "plain" or m in AMP_GRAD_SAMPLE_MODES)]
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, python {platform.python_version()}, "
          f"device {args.device}{' bf16 autocast' if args.amp else ''}, 1 torch thread, batch ~{args.batch}, "
          f"median of {args.repeats} epochs")
    print(f"{'task':<14} {'mode':<10} {'epoch s':>9} {'step ms':>9} {'x plain':>8} {'peak RSS MiB':>13} {'peak GPU MiB':>13}")
    rows: list[dict[str, Any]] = []
    for task in args.tasks.split(","):
        results: dict[str, dict[str, float]] = {}
        for mode in modes:
            cmd = [sys.executable, __file__, "--worker", task, mode, "--repeats", str(args.repeats),
                   "--batch", str(args.batch), "--device", args.device] + (["--amp"] if args.amp else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            res = results[mode] = json.loads(out)
            base = results["plain"]["median_s"]
            gpu = f"{res['peak_gpu_mib']:>13.0f}" if "peak_gpu_mib" in res else f"{'-':>13}"
            print(f"{task:<14} {mode:<10} {res['median_s']:>9.3f} {res['step_ms']:>9.2f} {res['median_s'] / base:>8.2f} "
                  f"{res['peak_rss_mib']:>13.0f} {gpu}", flush=True)
        rows += json_rows(task, results, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")


def json_rows(task: str, results: dict[str, dict[str, float]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each DP mode against plain PyTorch (time and peak RSS), and ghost (fedshield's default) against hooks."""
    detail = {"repeats": args.repeats, "batch": args.batch, "device": args.device, "amp": args.amp,
              "examples": results["plain"]["examples"], "note": f"median of {args.repeats} epoch(s), 1 torch thread"}
    pairs = [(f"{task}: {m} epoch vs plain", m, "plain", "median_s", "s") for m in results if m != "plain"]
    pairs += [(f"{task}: {m} peak RSS vs plain", m, "plain", "peak_rss_mib", "MiB") for m in results if m != "plain"]
    if "ghost" in results and "hooks" in results:
        pairs.append((f"{task}: ghost (fedshield default) epoch vs hooks (Opacus default)", "ghost", "hooks",
                      "median_s", "s"))
    rows = []
    for name, ours, base, key, unit in pairs:
        a, b = results[ours][key], results[base][key]
        rows.append({"name": name, "ours": a, "baseline": b, "unit": unit, "ratio": a / b if b else None,
                     "detail": {**detail, "better": "lower", "ours_is": ours, "baseline_is": base}})
    return rows


if __name__ == "__main__":
    main()
