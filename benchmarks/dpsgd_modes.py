"""DP-SGD epoch time and peak memory per Opacus grad-sample mode, beside plain PyTorch, on the built-in models.

Each (task, mode) runs in a fresh subprocess so peak RSS is its own; each repeats the epoch several times and the
median is reported, with its ratio to plain PyTorch measured in the same run. Usage::

    python benchmarks/dpsgd_modes.py [--repeats 5] [--batch 256] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

MODES = ("plain", "hooks", "functorch", "ghost")


def _worker(task_name: str, mode: str, repeats: int, batch: int, device: str) -> dict[str, float]:
    import resource

    import numpy as np
    import torch
    from torch import nn

    from fedshield.privacy.dpsgd import make_generator, train_dp_sgd, train_plain
    from fedshield.tasks import get_task

    torch.set_num_threads(1)
    task = get_task(task_name)
    data = task.load_bundled()
    # Replicate the data set so one epoch is long enough to time (digits: 1,797 -> ~14k examples).
    reps = max(1, 14_000 // len(data))
    from fedshield.data.spec import Dataset

    data = Dataset(np.concatenate([data.x] * reps), np.concatenate([data.y] * reps))
    q = batch / len(data)
    q = 1 / round(1 / q)
    times = []
    for r in range(repeats + 1):  # the first epoch warms up allocators and kernels; not counted
        model = task.new_model(0).to(device)
        start = time.perf_counter()
        if mode == "plain":
            train_plain(model, data, sample_rate=q, epochs=1, lr=0.1, loss_fn=nn.CrossEntropyLoss(),
                        generator=make_generator(r))
        else:
            train_dp_sgd(model, data, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q, epochs=1, lr=0.1,
                         loss_fn=nn.CrossEntropyLoss(), generator=make_generator(r), grad_sample_mode=mode)
        if device == "cuda":
            torch.cuda.synchronize()
        if r:
            times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_s": statistics.median(times), "peak_rss_mib": peak_mib, "examples": len(data)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tasks", default="digits,breast-cancer")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.worker[0], args.worker[1], args.repeats, args.batch, args.device)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, python {platform.python_version()}, "
          f"device {args.device}, 1 torch thread, batch ~{args.batch}, median of {args.repeats} epochs")
    print(f"{'task':<14} {'mode':<10} {'epoch s':>9} {'x plain':>8} {'peak RSS MiB':>13}")
    for task in args.tasks.split(","):
        base = None
        for mode in MODES:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", task, mode, "--repeats", str(args.repeats),
                 "--batch", str(args.batch), "--device", args.device],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            base = base or res["median_s"]
            print(f"{task:<14} {mode:<10} {res['median_s']:>9.3f} {res['median_s'] / base:>8.2f} {res['peak_rss_mib']:>13.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
