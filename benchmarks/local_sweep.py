"""The local-mode tuning sweep (issue 14 item 4): real ``fedshield simulate`` runs at 10 sites, Dirichlet 0.5.

Each configuration changes RunConfig settings of local mode (server optimiser and learning rate, client learning
rate, local epochs, sample rate, clipping norm, rounds) from the defaults; everything else is the product's default
(``benchmarks/utility.py``'s ``local``: a real run without SecAgg+, whose quantisation does not change accuracy).
Every configuration spends the same budget: sigma is calibrated by the run for its own q and steps, and each row
carries sigma, q, steps and epsilon recomputed from them.

Why these axes: under DP every site weighs the public constant 1 (an exact record count would leak), so a small
site's noise (sigma * C / (q * n_site) per step) reaches the average undiluted; the sweep looks for settings with
less noise per unit of progress: fewer, larger steps (q 1, one local epoch), other step sizes, a server optimiser
that averages noise over rounds (FedAvgM) or rescales it (FedAdam).
Two engines, the same settings:
* default: an in-process emulation of a local-mode run (:func:`emulate`), 3-5x cheaper than the real run on a
  loaded 2-core machine: each site runs ``train_dp_sgd`` seeded as the product seeds it (``hash((seed, site,
  server_round))``), the server averages uniformly (the public weight) and applies FedAvgM's or FedAdam's update
  exactly as Flower's ``serverapp.strategy`` classes write it; sigma is calibrated for the run's planned steps.
  Checked against the product at the defaults, seed 0: 31.2% vs the real run's 30.6%. (An emulation that also
  summed the sites' weights in the product's order matched the real run in every one of the 20 rounds; this one
  averages with ``torch.mean``, and the float-rounding difference grows chaotically under this much noise: treat
  one-seed differences of a few points as noise.) Its settings are the RunConfig keys the real run takes.
  Real runs matched it to 0.1 point at ``epochs1`` (seed 0), ``q1-epochs1`` (seed 0) and the defaults (seed 1).
  FedAvgM and FedAdam are Flower's update formulas re-written here; one 2-round, 3-site FedAdam (eta 0.05) check
  DISAGREED (real 25.9%, emulated 56.3%), cause not found: server-optimiser rows are not evidence for the product.
* ``--real``: the product itself, ``utility.local`` (a real ``fedshield simulate`` run), to confirm the winners.
Usage: ``python benchmarks/local_sweep.py [--real] [--configs a,b] [--seeds 0,1] [--epsilon 8] [--json rows.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from utility import DELTA, _accuracy, _split, accounting, get_task, local, make_generator, train_dp_sgd  # noqa: E402

#: RunConfig's defaults for local mode, which :func:`emulate` starts from (checked against RunConfig in main()).
DEFAULTS: dict[str, Any] = {"sample_rate": 0.5, "local_epochs": 2, "lr": 2.0, "max_grad_norm": 1.0, "num_rounds": 20,
                            "strategy": "fedavg", "strategy_params": {}}

#: name -> RunConfig settings changed from the defaults (q 0.5, 2 local epochs, lr 2, C 1, 20 rounds, FedAvg).
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "epochs1": {"local_epochs": 1},
    "q1-epochs1": {"sample_rate": 1.0, "local_epochs": 1},
    "q1-epochs1-lr4": {"sample_rate": 1.0, "local_epochs": 1, "lr": 4.0},
    "q0.25-epochs1": {"sample_rate": 0.25, "local_epochs": 1},
    "lr1": {"lr": 1.0},
    "lr4": {"lr": 4.0},
    "clip0.5": {"max_grad_norm": 0.5},
    "rounds10": {"num_rounds": 10},
    "rounds40-epochs1": {"num_rounds": 40, "local_epochs": 1},
    # Second stage, around the first stage's winner (full-batch steps, one local epoch).
    "epochs1-lr1": {"local_epochs": 1, "lr": 1.0},
    "q1-epochs1-rounds10": {"sample_rate": 1.0, "local_epochs": 1, "num_rounds": 10},
    "q1-epochs1-rounds40": {"sample_rate": 1.0, "local_epochs": 1, "num_rounds": 40},
    "q1-epochs1-lr1": {"sample_rate": 1.0, "local_epochs": 1, "lr": 1.0},
    "q1-epochs1-fedavgm0.9": {"sample_rate": 1.0, "local_epochs": 1, "strategy": "fedavgm",
                              "strategy_params": {"server_learning_rate": 0.1, "server_momentum": 0.9}},
    # FedAvgM at an effective server step of 1 (server lr / (1 - momentum)): momentum averages noise over rounds.
    "fedavgm0.9": {"strategy": "fedavgm", "strategy_params": {"server_learning_rate": 0.1, "server_momentum": 0.9}},
    "fedavgm0.5": {"strategy": "fedavgm", "strategy_params": {"server_learning_rate": 0.5, "server_momentum": 0.5}},
    "fedadam0.01": {"strategy": "fedadam", "strategy_params": {"eta": 0.01, "tau": 1e-3}},
    "fedadam0.05": {"strategy": "fedadam", "strategy_params": {"eta": 0.05, "tau": 1e-3}},
}


class ServerOpt:
    """FedAvg, FedAvgM or FedAdam's server step on the uniform average, as flwr.serverapp.strategy writes them."""

    def __init__(self, name: str, params: dict[str, float]) -> None:
        self.name, self.p = name, params
        self.m: list[np.ndarray] | None = None
        self.v: list[np.ndarray] | None = None

    def step(self, current: list[np.ndarray], average: list[np.ndarray], server_round: int) -> list[np.ndarray]:
        if self.name == "fedavg":
            return average
        if self.name == "fedavgm":
            grad = [c - a for c, a in zip(current, average)]
            mom = self.p.get("server_momentum", 0.0)
            if mom > 0:
                self.m = grad if self.m is None else [mom * m + g for m, g in zip(self.m, grad)]
                grad = self.m
            return [c - self.p.get("server_learning_rate", 1.0) * g for c, g in zip(current, grad)]
        if self.name != "fedadam":
            raise ValueError(f"emulate has no server optimiser {self.name!r}: use --real")
        b1, b2 = self.p.get("beta_1", 0.9), self.p.get("beta_2", 0.99)
        delta = [a - c for c, a in zip(current, average)]
        self.m = [(1 - b1) * d if self.m is None else b1 * m + (1 - b1) * d for m, d in
                  zip(self.m or delta, delta)]
        self.v = [b2 * v + (1 - b2) * d * d for v, d in zip(self.v or [np.zeros_like(d) for d in delta], delta)]
        eta = self.p.get("eta", 0.1) * np.sqrt(1 - b2 ** (server_round + 1.0)) / (1 - b1 ** (server_round + 1.0))
        return [c + eta * m / (np.sqrt(v) + self.p.get("tau", 1e-3)) for c, m, v in zip(current, self.m, self.v)]


def emulate(sites: int, partition: str, eps: float, seed: int, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """One local-mode run in this process (module docstring); the same row keys as ``utility.local``."""
    c = {**DEFAULTS, **(settings or {})}
    task, (parts, test) = get_task("digits"), _split(sites, partition, seed)
    q, epochs, rounds = float(c["sample_rate"]), int(c["local_epochs"]), int(c["num_rounds"])
    steps = rounds * epochs * round(1 / q)
    sigma = accounting.calibrate_noise_multiplier(target_epsilon=eps, delta=DELTA, sample_rate=q, steps=steps)
    model, opt = task.new_model(seed), ServerOpt(str(c["strategy"]), dict(c["strategy_params"]))
    keys = list(model.state_dict())
    for server_round in range(1, rounds + 1):
        states = []
        for i, part in enumerate(parts):
            site = task.new_model(seed)
            site.load_state_dict(model.state_dict())
            train_dp_sgd(site, part, noise_multiplier=sigma, max_grad_norm=float(c["max_grad_norm"]), sample_rate=q,
                         epochs=epochs, lr=float(c["lr"]), loss_fn=task.loss_fn(), grad_sample_mode="ghost",
                         generator=make_generator(hash((seed, i, server_round)) & (2**62 - 1)))
            states.append(site.state_dict())
        average = [torch.stack([s[k] for s in states]).mean(dim=0).numpy() for k in keys]
        current = [model.state_dict()[k].numpy() for k in keys]
        new = opt.step(current, average, server_round)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in zip(keys, new)})
    return {"accuracy": _accuracy(model, test), "sigma": sigma, "q": q, "steps": steps, "lr": float(c["lr"]),
            "clip": float(c["max_grad_norm"]), "accountant": "prv", "rounds": rounds, "local_epochs": epochs,
            "strategy": c["strategy"], "strategy_params": c["strategy_params"],
            "epsilon_spent": accounting.epsilon([(sigma, q, steps)], delta=DELTA)}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| configuration | settings | sigma | q | steps | epsilon (recomputed) | accuracy mean | median | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in dict.fromkeys(r["config"] for r in rows):
        same = [r for r in rows if r["config"] == name]
        accs = [float(r["accuracy"]) for r in same]
        first = same[0]
        lines.append(
            f"| {name} | {json.dumps(CONFIGS.get(name, {}))} | {first['sigma']:.3f} | {first['q']:g} | {first['steps']} | "
            f"{max(r['epsilon_spent'] for r in same):.3f} | {100 * statistics.mean(accs):.1f}% | "
            f"{100 * statistics.median(accs):.1f}% | {len(same)} |")
    return "\n".join(lines)


def _check_defaults() -> None:
    """The emulation starts from RunConfig's defaults: fail loudly if they moved and DEFAULTS did not."""
    from fedshield.config import RunConfig

    cfg = RunConfig()
    actual = {k: getattr(cfg, k) for k in DEFAULTS if k != "strategy_params"}
    actual["strategy_params"] = cfg.strategy_params.to_dict()
    if actual != DEFAULTS:
        raise SystemExit(f"local_sweep.DEFAULTS {DEFAULTS} differ from RunConfig's defaults {actual}: update DEFAULTS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--partition", default="dirichlet:0.5")
    ap.add_argument("--real", action="store_true", help="real fedshield simulate runs instead of the emulation")
    ap.add_argument("--json", type=Path, help="write the rows here (each row is also appended to NAME.partial.jsonl)")
    args = ap.parse_args()
    _check_defaults()
    torch.set_num_threads(1)
    engine = local if args.real else emulate
    rows = []
    for name in args.configs.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.monotonic()
            result = engine(args.sites, args.partition, args.epsilon, seed, CONFIGS[name])
            row = {"config": name, "engine": "real" if args.real else "emulation", "epsilon": args.epsilon, "sites": args.sites, "partition": args.partition,
                   "seed": seed, **result, "seconds": round(time.monotonic() - start, 1),
                   "loadavg": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                with args.json.with_suffix(".partial.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
