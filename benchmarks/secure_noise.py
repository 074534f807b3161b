"""Cost of CSPRNG DP-SGD noise (fedshield's SecureGaussian: ChaCha20 + Opacus secure_mode's sum of four) against
torch's seeded generator (what Opacus uses by default, and what simulations keep), in the same run.

Two measurements per built-in task, medians over ``--repeats``:

* one DP-SGD step (``train_dp_sgd``, one epoch divided by its steps), torch generator vs SecureGaussian;
* noise alone for one step of that model (every parameter once): ``torch.normal`` (Opacus default), four
  ``torch.normal`` draws (Opacus ``secure_mode``'s arithmetic on torch's generator) and SecureGaussian.

Usage::

    python benchmarks/secure_noise.py [--repeats 5] [--batch 256] [--tasks digits,breast-cancer] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any


def _step_ms(task_name: str, batch: int, repeats: int) -> dict[str, float]:
    import numpy as np
    from torch import nn

    from fedshield.dataspec import Dataset
    from fedshield.privacy.dpsgd import train_dp_sgd
    from fedshield.training import make_generator
    from fedshield.privacy.secure_noise import SecureGaussian
    from fedshield.tasks import get_task

    task = get_task(task_name)
    data = task.load_bundled()
    reps = max(1, 4_000 // len(data))
    data = Dataset(np.concatenate([data.x] * reps), np.concatenate([data.y] * reps))
    q = 1 / round(len(data) / batch)
    steps = round(1 / q)
    times: dict[str, list[float]] = {"torch": [], "secure": []}
    for r in range(repeats + 1):  # round 0 warms up; alternate so both see the same machine load
        for kind in ("torch", "secure"):
            model = task.new_model(0)
            start = time.perf_counter()
            train_dp_sgd(model, data, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=q, epochs=1, lr=0.1,
                         loss_fn=nn.CrossEntropyLoss(), generator=make_generator(r), grad_sample_mode="ghost",
                         secure_noise=SecureGaussian() if kind == "secure" else None)
            if r:
                times[kind].append(1000 * (time.perf_counter() - start) / steps)
    params = sum(p.numel() for p in task.new_model(0).parameters())
    return {"torch": statistics.median(times["torch"]), "secure": statistics.median(times["secure"]),
            "params": params, "steps": steps, "examples": len(data)}


def _noise_ms(task_name: str, repeats: int) -> dict[str, float]:
    import torch

    from fedshield.privacy.secure_noise import SecureGaussian
    from fedshield.tasks import get_task

    refs = [torch.zeros_like(p) for p in get_task(task_name).new_model(0).parameters()]
    gen, secure = torch.Generator().manual_seed(0), SecureGaussian()

    def plain() -> None:
        for ref in refs:
            torch.normal(0.0, 1.0, size=ref.shape, generator=gen)

    def four() -> None:
        for ref in refs:
            sum(torch.normal(0.0, 1.0, size=ref.shape, generator=gen) for _ in range(4)) / 2

    def csprng() -> None:
        for ref in refs:
            secure.noise(1.0, ref)

    out = {}
    for name, fn in (("torch", plain), ("torch_x4", four), ("secure", csprng)):
        fn()
        samples = []
        for _ in range(max(5, repeats * 4)):
            start = time.perf_counter()
            fn()
            samples.append(1000 * (time.perf_counter() - start))
        out[name] = statistics.median(samples)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tasks", default="digits,breast-cancer")
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {platform.system()}, python "
          f"{platform.python_version()}, 1 torch thread, batch ~{args.batch}, ghost clipping, median of {args.repeats}")
    print(f"{'task':<14} {'params':>8} {'step ms torch':>14} {'step ms secure':>15} {'x':>6} "
          f"{'noise ms torch':>15} {'torch x4':>9} {'secure':>8} {'x':>6}")
    rows: list[dict[str, Any]] = []
    for task in args.tasks.split(","):
        step, noise = _step_ms(task, args.batch, args.repeats), _noise_ms(task, args.repeats)
        print(f"{task:<14} {step['params']:>8.0f} {step['torch']:>14.2f} {step['secure']:>15.2f} "
              f"{step['secure'] / step['torch']:>6.2f} {noise['torch']:>15.3f} {noise['torch_x4']:>9.3f} "
              f"{noise['secure']:>8.3f} {noise['secure'] / noise['torch']:>6.2f}", flush=True)
        detail = {"repeats": args.repeats, "batch": args.batch, "params": step["params"], "steps": step["steps"],
                  "examples": step["examples"], "better": "lower", "note": "median, 1 torch thread, CPU"}
        rows += [
            {"name": f"{task}: DP-SGD step, CSPRNG noise vs torch generator", "ours": step["secure"],
             "baseline": step["torch"], "unit": "ms", "ratio": step["secure"] / step["torch"], "detail": detail},
            {"name": f"{task}: noise for one step, CSPRNG vs torch.normal", "ours": noise["secure"],
             "baseline": noise["torch"], "unit": "ms", "ratio": noise["secure"] / noise["torch"],
             "detail": {**detail, "torch_secure_mode_arithmetic_ms": noise["torch_x4"]}},
        ]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
