"""Utility of record-level DP on digits: central DP-SGD vs fedshield local vs fedshield distributed (Skellam).

Each method runs in this process with the functions a fedshield run uses, so a grid of dozens of runs fits in
minutes on a laptop CPU:

* ``central``: Opacus DP-SGD (``fedshield.privacy.dpsgd.train_dp_sgd``) on the pooled training records of all
  sites, sigma calibrated with the PRV accountant for ``epochs / q`` steps.
* ``distributed``: per round every site computes its Skellam field vector (``client.distributed_step.
  site_field_vector``: Poisson sample, Opacus per-example gradients and clipping, rotation, conditional rounding,
  a 1/min_honest noise share), the vectors are summed modulo the field (what SecAgg+ reveals: its masks cancel
  exactly, tested in tests/test_distributed_dp.py) and ``strategies.distributed_dp.dp_sgd_step`` takes one step;
  sigma calibrated with the Skellam accountant for the same number of steps as central.
* ``local``: every site runs DP-SGD on its own records (``train_dp_sgd``, fedshield's defaults: q 0.5, 2 local
  epochs, lr 2, 20 rounds), sigma calibrated per site with PRV; the server averages the models uniformly (FedAvg
  with public weight 1). SecAgg+'s 2^22-level quantisation of the update is left out (a relative error ~1e-6).

Accuracy is on the server's held-out test set (``split_federated``). Figures are medians of seeds.
Usage: ``python benchmarks/utility.py [--quick] [--json rows.json] [--plot accuracy_vs_epsilon.png]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedshield.client.distributed_step import flat_dim, site_field_vector  # noqa: E402
from fedshield.config import PartitionSpec  # noqa: E402
from fedshield.privacy.rotation import RandomizedHadamard, round_seed  # noqa: E402
from fedshield.data.partition import split_federated  # noqa: E402
from fedshield.dataspec import Dataset  # noqa: E402
from fedshield.privacy.accounting import calibrate_noise_multiplier  # noqa: E402
from fedshield.privacy.dpsgd import train_dp_sgd  # noqa: E402
from fedshield.training import evaluate, make_generator  # noqa: E402
from fedshield.privacy.skellam import plan  # noqa: E402
from fedshield.privacy.skellam_accountant import calibrate as skellam_calibrate  # noqa: E402
from fedshield.strategies.distributed_dp import dp_sgd_step  # noqa: E402
from fedshield.tasks import get_task  # noqa: E402

DELTA = 1e-5
#: Central / distributed DP-SGD settings (the same for both: one step over the union per round).
CENTRAL = {"q": 1 / 16, "epochs": 20, "lr": 2.0, "clip": 1.0}
#: fedshield local mode's defaults.
LOCAL = {"q": 0.5, "epochs": 2, "lr": 2.0, "clip": 1.0, "rounds": 20}


def _split(sites: int, partition: str, seed: int):  # type: ignore[no-untyped-def]
    data = get_task("digits").load_bundled()
    split = split_federated(data, PartitionSpec.parse(partition), sites, seed)
    return [train for train, _ in split.clients], split.server_test


def _pool(parts: list[Dataset]) -> Dataset:
    return Dataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def _accuracy(model: torch.nn.Module, test: Dataset) -> float:
    return evaluate(model, test, get_task("digits").loss_fn())[1]


def central(parts: list[Dataset], test: Dataset, eps: float, seed: int) -> float:
    task, c = get_task("digits"), CENTRAL
    steps = int(c["epochs"] / c["q"])
    sigma = calibrate_noise_multiplier(target_epsilon=eps, delta=DELTA, sample_rate=c["q"], steps=steps)
    model = task.new_model(seed)
    train_dp_sgd(model, _pool(parts), noise_multiplier=sigma, max_grad_norm=c["clip"], sample_rate=c["q"],
                 epochs=int(c["epochs"]), lr=c["lr"], loss_fn=task.loss_fn(), generator=make_generator(seed),
                 grad_sample_mode="ghost")
    return _accuracy(model, test)


def distributed(parts: list[Dataset], test: Dataset, eps: float, seed: int, min_honest: float = 0.5) -> float:
    task, c = get_task("digits"), CENTRAL
    rounds = int(c["epochs"] / c["q"])
    sigma = skellam_calibrate(target_epsilon=eps, delta=DELTA, sample_rate=c["q"], steps=rounds)
    model = task.new_model(seed)
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    dim, n = flat_dim(model), sum(len(p) for p in parts)
    expected = c["q"] * n
    p = plan(clip=c["clip"], noise_multiplier=sigma, dim=dim, min_honest=max(1, round(min_honest * len(parts))),
             num_sites=len(parts), batch_bound=int(expected + 10 * expected**0.5 + 10))
    gens = [make_generator(seed * 1000 + i) for i in range(len(parts))]
    noise = [np.random.default_rng([seed, i]) for i in range(len(parts))]
    for r in range(rounds):
        rot = RandomizedHadamard(dim, round_seed(f"bench-{seed}", r))
        field = sum(site_field_vector(model, part, p, rot, sample_rate=c["q"], loss_fn=task.loss_fn(), generator=g,
                                      noise_rng=nr) for part, g, nr in zip(parts, gens, noise)) % p.modulus
        params = {k: v.detach().numpy() for k, v in model.named_parameters()}
        new = dp_sgd_step({k: params[k] for k in names}, field, p, rot, lr=c["lr"], expected_batch=expected)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()}, strict=False)
    return _accuracy(model, test)


def local(parts: list[Dataset], test: Dataset, eps: float, seed: int) -> float:
    task, c = get_task("digits"), LOCAL
    steps = int(c["rounds"] * c["epochs"] / c["q"])
    sigma = calibrate_noise_multiplier(target_epsilon=eps, delta=DELTA, sample_rate=c["q"], steps=steps)
    model = task.new_model(seed)
    for r in range(int(c["rounds"])):
        states = []
        for i, part in enumerate(parts):
            site = task.new_model(seed)
            site.load_state_dict(model.state_dict())
            train_dp_sgd(site, part, noise_multiplier=sigma, max_grad_norm=c["clip"], sample_rate=c["q"],
                         epochs=int(c["epochs"]), lr=c["lr"], loss_fn=task.loss_fn(),
                         generator=make_generator(hash((seed, i, r)) & (2**62 - 1)), grad_sample_mode="ghost")
            states.append(site.state_dict())
        model.load_state_dict({k: torch.stack([s[k] for s in states]).mean(dim=0) for k in states[0]})
    return _accuracy(model, test)


METHODS = {"central": central, "local": local, "distributed": distributed}


def run(grid: list[tuple[str, float, int, str, int]], min_honest: float = 0.5) -> list[dict[str, object]]:
    rows = []
    for method, eps, sites, partition, seed in grid:
        parts, test = _split(sites, partition, seed)
        start = time.monotonic()
        acc = distributed(parts, test, eps, seed, min_honest) if method == "distributed" else \
            METHODS[method](parts, test, eps, seed)
        rows.append({"method": method, "min_honest": min_honest if method == "distributed" else None, "epsilon": eps, "sites": sites, "partition": partition, "seed": seed,
                     "accuracy": acc, "seconds": round(time.monotonic() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    keys = sorted({(r["sites"], r["partition"], r["epsilon"]) for r in rows})
    lines = ["| sites | partition | epsilon | central | local | distributed | seeds |", "|---|---|---|---|---|---|---|"]
    for sites, partition, eps in keys:
        cells = []
        for m in ("central", "local", "distributed"):
            accs = [float(r["accuracy"]) for r in rows if (r["sites"], r["partition"], r["epsilon"], r["method"])
                    == (sites, partition, eps, m)]
            cells.append(f"{100 * statistics.median(accs):.1f}%" if accs else "not run")
        seeds = len({r["seed"] for r in rows if (r["sites"], r["partition"], r["epsilon"]) == (sites, partition, eps)})
        lines.append(f"| {sites} | {partition} | {eps:g} | {' | '.join(cells)} | {seeds} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for m, style in (("central", "k-o"), ("distributed", "b-s"), ("local", "r-^")):
        eps = sorted({float(r["epsilon"]) for r in rows if r["method"] == m})
        acc = [statistics.median(float(r["accuracy"]) for r in rows if r["method"] == m and r["epsilon"] == e)
               for e in eps]
        if eps:
            ax.plot(eps, [100 * a for a in acc], style, label=m)
    ax.set_xlabel("record-level epsilon (delta 1e-5)")
    ax.set_ylabel("server test accuracy (%), median")
    ax.set_title("digits: 10 sites, Dirichlet 0.5")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, epsilon 8, 10 sites, Dirichlet 0.5")
    ap.add_argument("--smoke", action="store_true", help="seconds: 3 sites, 2 rounds/epochs (smoke test only)")
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--sites", default="5,10")
    ap.add_argument("--partitions", default="iid,dirichlet:0.5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--methods", default="central,local,distributed")
    ap.add_argument("--epochs", type=int, default=CENTRAL["epochs"], help="central/distributed epochs (steps = epochs/q)")
    ap.add_argument("--min-honest", type=float, default=0.5, help="distributed: fraction of sites assumed honest")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    CENTRAL["epochs"] = args.epochs
    torch.set_num_threads(1)
    if args.smoke:
        CENTRAL.update(epochs=1)
        LOCAL.update(rounds=1, epochs=1)
        args.epsilons, args.sites, args.partitions, args.seeds = "8", "3", "iid", 1
    elif args.quick:
        args.epsilons, args.sites, args.partitions, args.seeds = "8", "10", "dirichlet:0.5", 1
    grid = [(m, float(e), int(s), p, seed) for e in args.epsilons.split(",") for s in args.sites.split(",")
            for p in args.partitions.split(",") for seed in range(args.seeds) for m in args.methods.split(",")]
    rows = run(grid, args.min_honest)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
