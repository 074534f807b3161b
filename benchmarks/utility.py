"""Utility of record-level DP on digits: central DP-SGD vs fedshield local vs fedshield distributed (Skellam).

* ``central``: Opacus DP-SGD (``fedshield.privacy.dpsgd.train_dp_sgd``) on the pooled training records of all
  sites, in this process; sigma calibrated with the PRV accountant for ``epochs / q`` steps.
* ``distributed``: in this process, with the functions a distributed fedshield round runs: per round every site
  computes its Skellam field vector (``client.distributed_step.site_field_vector``: Poisson sample, Opacus
  per-example gradients and clipping, rotation, conditional rounding, a 1/min_honest noise share), the vectors are
  summed modulo the field (what SecAgg+ reveals: its masks cancel exactly, tested in tests/test_distributed_dp.py)
  and ``strategies.distributed_dp.dp_sgd_step`` takes one step; sigma calibrated with the Skellam accountant for
  the same q and number of steps as central (one step a round). Emulated in-process because its 100s of rounds
  would cost minutes of Ray polling each.
* ``local``: THE PRODUCT ITSELF, not an emulation: a real ``python -m fedshield simulate`` run (Flower's
  simulation engine, Ray, fedshield's ClientApp and ServerApp, RunConfig's defaults unless the sweep overrides
  them), with ``--no-secagg`` (SecAgg+ only quantises the sum: a real run with it gave 29.8% vs 30.6% without at
  seed 0, same trajectory) and ``fraction_evaluate 0`` (clients' own evaluation does not change the model).
  Accuracy, sigma and epsilon are read from the run's ``metrics.jsonl`` (last round) and ``privacy.json``.
  (The in-process emulation this replaced gave 54.6% where the real run gives 30.6% at seed 0: it drew each
  round's sampling and noise from round index r instead of the server round r + 1. With r + 1 it reproduced the
  real run round by round, 30.6% final; the issue's 76.6% is that run with FedAvg weighted by record counts, as
  before the public weight of commit 113904f: 76.3%. See the utility section of benchmarks/RESULTS.md.)

Every row carries the mechanism's parameters and ``epsilon_spent`` recomputed from them (central and local with
``privacy.accounting.epsilon``, distributed with ``privacy.skellam_accountant.epsilon`` on the round's plan).
Accuracy is on the server's held-out test set (``split_federated``), the last round's model. Tables show the mean
and the median of the seeds.
Usage: ``python benchmarks/utility.py [--quick] [--json rows.json] [--plot accuracy_vs_epsilon.png]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedshield.client.distributed_step import flat_dim, site_field_vector  # noqa: E402
from fedshield.config import PartitionSpec  # noqa: E402
from fedshield.privacy.rotation import RandomizedHadamard, round_seed  # noqa: E402
from fedshield.data.partition import split_federated  # noqa: E402
from fedshield.dataspec import Dataset  # noqa: E402
from fedshield.privacy import accounting  # noqa: E402
from fedshield.privacy.dpsgd import train_dp_sgd  # noqa: E402
from fedshield.training import evaluate, make_generator  # noqa: E402
from fedshield.privacy import skellam_accountant  # noqa: E402
from fedshield.privacy.skellam import plan  # noqa: E402
from fedshield.strategies.distributed_dp import dp_sgd_step  # noqa: E402
from fedshield.tasks import get_task  # noqa: E402

DELTA = 1e-5
#: Central / distributed DP-SGD settings (the same for both: one step over the union per round).
CENTRAL: dict[str, float] = {"q": 1 / 16, "epochs": 20, "lr": 2.0, "clip": 1.0}
#: RunConfig keys that ``run`` passes to every local run (empty: fedshield's defaults; the smoke mode shortens it).
LOCAL: dict[str, Any] = {}
#: ``prv_sigma``: distributed runs with central's sigma (a diagnostic, see :func:`distributed`).
DIAGNOSTIC: dict[str, bool] = {"prv_sigma": False}
#: The Skellam accountant's Poisson-sampling step, recorded in every distributed row. Rows from before 2026-12-03
#: carry ``SUPERSEDED_SAMPLING`` (Zhu & Wang 2019 Thm 6): their sigma is not what the product calibrates now, so
#: they are kept for the record, shown apart, and never a method's best setting.
SAMPLING_BOUND = "binomial expansion (remove direction; add is never larger)"
SUPERSEDED_SAMPLING = "zhu-wang-thm6"
#: Table and plot column order.
ORDER = ("central", "distributed mh 1", "distributed mh 0.5", "local")
Row = dict[str, Any]


def _split(sites: int, partition: str, seed: int):  # type: ignore[no-untyped-def]
    data = get_task("digits").load_bundled()
    split = split_federated(data, PartitionSpec.parse(partition), sites, seed)
    return [train for train, _ in split.clients], split.server_test


def _pool(parts: list[Dataset]) -> Dataset:
    return Dataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def _accuracy(model: torch.nn.Module, test: Dataset) -> float:
    return evaluate(model, test, get_task("digits").loss_fn())[1]


def central(sites: int, partition: str, eps: float, seed: int) -> Row:
    task, c = get_task("digits"), CENTRAL
    parts, test = _split(sites, partition, seed)
    steps = int(round(c["epochs"] / c["q"]))
    sigma = accounting.calibrate_noise_multiplier(target_epsilon=eps, delta=DELTA, sample_rate=c["q"], steps=steps)
    model = task.new_model(seed)
    train_dp_sgd(model, _pool(parts), noise_multiplier=sigma, max_grad_norm=c["clip"], sample_rate=c["q"],
                 epochs=int(c["epochs"]), lr=c["lr"], loss_fn=task.loss_fn(), generator=make_generator(seed),
                 grad_sample_mode="ghost")
    spent = accounting.epsilon([(sigma, c["q"], steps)], delta=DELTA)
    return {"accuracy": _accuracy(model, test), "sigma": sigma, "q": c["q"], "steps": steps, "lr": c["lr"],
            "clip": c["clip"], "accountant": "prv", "epsilon_spent": spent}


def distributed(sites: int, partition: str, eps: float, seed: int, min_honest: float = 0.5) -> Row:
    """``DIAGNOSTIC["prv_sigma"]``: use central's PRV sigma instead of the Skellam accountant's, to separate the
    mechanism's cost from the accountant's. Not a guarantee at ``eps``: the row's ``epsilon_spent`` is still the
    Skellam accountant's for the sigma used (higher than ``eps``), and the row is marked ``diagnostic``."""
    task, c = get_task("digits"), CENTRAL
    parts, test = _split(sites, partition, seed)
    rounds = int(round(c["epochs"] / c["q"]))
    calibrate = accounting.calibrate_noise_multiplier if DIAGNOSTIC["prv_sigma"] else skellam_accountant.calibrate
    sigma = calibrate(target_epsilon=eps, delta=DELTA, sample_rate=c["q"], steps=rounds)
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
    entry = (p.total_mu, p.l1_bound, p.l2_bound, c["q"], rounds)
    return {"accuracy": _accuracy(model, test), "sigma": sigma, "q": c["q"], "steps": rounds, "lr": c["lr"],
            "clip": c["clip"], "accountant": "skellam-rdp", "skellam_sampling": SAMPLING_BOUND,
            "skellam_entry": list(entry), "min_honest_sites":
            p.min_honest, "epsilon_spent": skellam_accountant.epsilon([entry], delta=DELTA),
            **({"diagnostic": "sigma calibrated by PRV for central, NOT a guarantee at the target epsilon"}
               if DIAGNOSTIC["prv_sigma"] else {})}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def local(sites: int, partition: str, eps: float, seed: int, settings: dict[str, Any] | None = None) -> Row:
    """One real ``fedshield simulate`` run; ``settings``: RunConfig keys (``strategy_params`` a dict) overriding its
    defaults. Raises RuntimeError (with the end of the run's output) if the run fails."""
    settings = dict(settings or {})
    params = settings.pop("strategy_params", {})
    keys = {"num_clients": sites, "partition": partition, "epsilon": eps, "seed": seed, "secagg": False,
            "fraction_evaluate": 0.0, **settings}
    if params:  # TOML: the strategy's name moves into its table (files._strategy_table)
        params = {"name": keys.pop("strategy", "fedavg"), **params}
    text = "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
    text += "[strategy]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in params.items()) if params else ""
    with tempfile.TemporaryDirectory(prefix="utility-local-") as tmp:
        (Path(tmp) / "run.toml").write_text(text)
        out = Path(tmp) / "run"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, "-m", "fedshield", "simulate", "--config", str(Path(tmp) / "run.toml"),
                               "--out", str(out)], cwd=tmp, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise RuntimeError(f"fedshield simulate exited {proc.returncode}:\n" + "\n".join(tail))
        last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        privacy = json.loads((out / "privacy.json").read_text())
        config = json.loads((out / "config.json").read_text())
    mech = privacy["mechanism"]
    steps = max(c["steps"] for c in privacy["clients"].values())
    sigma, q = float(mech["noise_multiplier"]), float(mech["sample_rate"])
    return {"accuracy": float(last["accuracy"]), "sigma": sigma, "q": q, "steps": steps, "lr": config["lr"],
            "clip": float(mech["max_grad_norm"]), "accountant": mech["accountant"],
            "epsilon_reported": privacy["guarantee"]["epsilon"], "rounds": config["num_rounds"],
            "local_epochs": config["local_epochs"], "strategy": config["strategy"],
            "strategy_params": config["strategy_params"],
            "epsilon_spent": accounting.epsilon([(sigma, q, steps)], delta=DELTA, accountant=mech["accountant"])}


def label(row: Row) -> str:
    """The table column of a row: the method, and distributed's min-honest fraction."""
    if row["method"] == "distributed":
        old = " (Thm 6 accountant, superseded)" if row.get("skellam_sampling") == SUPERSEDED_SAMPLING else ""
        return f"distributed mh {float(row['min_honest']):g}{old}" + (
            " (PRV sigma: diagnostic)" if "diagnostic" in row else "")
    return str(row["method"])


def run(grid: list[tuple[str, float, int, str, int]], min_honest: float | list[float] = 0.5,
        log: Path | None = None) -> list[Row]:
    """Run ``grid`` (method, epsilon, sites, partition, seed); distributed once per min-honest fraction. Each row is
    printed (and appended to ``log``) as it finishes, so a long grid that is cut short keeps its rows."""
    honest = [min_honest] if isinstance(min_honest, (int, float)) else list(min_honest)
    rows: list[Row] = []
    for method, eps, sites, partition, seed in grid:
        for mh in honest if method == "distributed" else [None]:
            start = time.monotonic()
            if method == "distributed":
                result = distributed(sites, partition, eps, seed, float(mh))  # type: ignore[arg-type]
            elif method == "local":
                result = local(sites, partition, eps, seed, LOCAL)
            else:
                result = METHODS[method](sites, partition, eps, seed)
            row = {"method": method, "min_honest": mh, "epsilon": eps, "sites": sites, "partition": partition,
                   "seed": seed, **result, "seconds": round(time.monotonic() - start, 1),
                   "loadavg": os.getloadavg()[0]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if log is not None:
                with log.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return rows


METHODS = {"central": central, "local": local, "distributed": distributed}


def _cell(accs: list[float]) -> str:
    if not accs:
        return "not run"
    return f"{100 * statistics.mean(accs):.1f}% / {100 * statistics.median(accs):.1f}%"


def table(rows: list[Row]) -> str:
    """Mean / median accuracy of the seeds, one line per (sites, partition, epsilon), one column per method."""
    labels = sorted({label(r) for r in rows}, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))
    keys = sorted({(r["sites"], r["partition"], r["epsilon"]) for r in rows})
    lines = [f"| sites | partition | epsilon | {' | '.join(labels)} | seeds |", "|---" * (len(labels) + 4) + "|"]
    for sites, partition, eps in keys:
        same = [r for r in rows if (r["sites"], r["partition"], r["epsilon"]) == (sites, partition, eps)]
        cells = [_cell([float(r["accuracy"]) for r in same if label(r) == m]) for m in labels]
        lines.append(f"| {sites} | {partition} | {eps:g} | {' | '.join(cells)} | {len({r['seed'] for r in same})} |")
    return "\n".join(lines)


def detail_table(rows: list[Row]) -> str:
    """One line per (setting, method, mechanism parameters): sigma, q, steps and the recomputed epsilon beside the
    mean / median accuracy of the seeds, so every epsilon recomputes from its own line."""
    head = ("| sites | partition | epsilon | method | q | steps | lr | sigma | epsilon (recomputed, max) | accountant | "
            "accuracy mean / median | seeds |")
    lines = [head, "|---" * 12 + "|"]
    keys = sorted({(r["sites"], r["partition"], r["epsilon"], label(r), r["q"], r["steps"], r["lr"]) for r in rows},
                  key=lambda k: (k[0], k[1], -k[2], ORDER.index(k[3]) if k[3] in ORDER else 9, k[4], k[5], k[6]))
    for key in keys:
        same = [r for r in rows if (r["sites"], r["partition"], r["epsilon"], label(r), r["q"], r["steps"], r["lr"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | {key[3]} | {key[4]:g} | {key[5]} | {key[6]:g} | "
                     f"{same[0]['sigma']:.3f} | {max(r['epsilon_spent'] for r in same):.3f} | {same[0]['accountant']} | "
                     f"{_cell([float(r['accuracy']) for r in same])} | {len(same)} |")
    return "\n".join(lines)


def best(rows: list[Row]) -> dict[tuple[int, str, str, float], list[Row]]:
    """Per (sites, partition, method, epsilon): the rows of the (q, steps, lr) with the best mean accuracy, among
    the settings run with the most seeds (a 1-seed screening row never beats a 3-seed one). Diagnostic rows are
    left out (not private at their target epsilon), and so are superseded-accountant rows. Tuned on the evaluation
    seeds, as the grid was."""
    groups: dict[tuple[int, str, str, float], dict[tuple[float, int, float], list[Row]]] = {}
    for r in rows:
        if "diagnostic" in r or r.get("skellam_sampling") == SUPERSEDED_SAMPLING:
            continue
        key = (int(r["sites"]), str(r["partition"]), label(r), float(r["epsilon"]))
        groups.setdefault(key, {}).setdefault((float(r["q"]), int(r["steps"]), float(r["lr"])), []).append(r)
    out = {}
    for key, settings in groups.items():
        most = max(len({r["seed"] for r in g}) for g in settings.values())
        full = [g for g in settings.values() if len({r["seed"] for r in g}) == most]
        out[key] = max(full, key=lambda g: statistics.mean(float(r["accuracy"]) for r in g))
    return out


def best_table(rows: list[Row]) -> str:
    """Mean / median accuracy of each method's best setting (``best``), with that setting and its seeds."""
    chosen = best(rows)
    lines = ["| sites | partition | epsilon | method | q | steps | accuracy mean / median | min-max | seeds |",
             "|---" * 9 + "|"]
    for (sites, partition, m, eps), g in sorted(chosen.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][3],
                                                  ORDER.index(kv[0][2]) if kv[0][2] in ORDER else 9)):
        accs = [float(r["accuracy"]) for r in g]
        lines.append(f"| {sites} | {partition} | {eps:g} | {m} | {g[0]['q']:g} | {g[0]['steps']} | {_cell(accs)} | "
                     f"{100 * min(accs):.1f}-{100 * max(accs):.1f}% | {len(g)} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    """Accuracy vs epsilon, one panel per (sites, partition): each method at its best setting per epsilon
    (``best``), the mean of the seeds with their min-max as the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = best(rows)
    setups = sorted({(k[0], k[1]) for k in chosen}, key=lambda s: (-s[0], s[1]))
    fig, axes = plt.subplots(1, len(setups), figsize=(5.5 * len(setups), 4), squeeze=False)
    styles = {"central": "k-o", "distributed mh 1": "b-s", "distributed mh 0.5": "c-s", "local": "r-^"}
    for ax, (sites, partition) in zip(axes[0], setups):
        for m in [m for m in ORDER if any(k[:3] == (sites, partition, m) for k in chosen)]:
            eps = sorted(k[3] for k in chosen if k[:3] == (sites, partition, m))
            accs = [[100 * float(r["accuracy"]) for r in chosen[(sites, partition, m, e)]] for e in eps]
            mean = [statistics.mean(a) for a in accs]
            err = [[mu - min(a) for mu, a in zip(mean, accs)], [max(a) - mu for mu, a in zip(mean, accs)]]
            seeds = sorted({len(a) for a in accs})
            ax.errorbar(eps, mean, yerr=err, fmt=styles.get(m, "g-x"), capsize=3,
                        label=f"{m} ({'/'.join(map(str, seeds))} seeds)")
        ax.set_xscale("log")
        ax.set_xticks([1, 3, 8], ["1", "3", "8"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("record-level epsilon (delta 1e-5)")
        ax.set_ylabel("server test accuracy (%): mean, min-max of seeds")
        ax.set_title(f"digits: {sites} sites, {partition}; best (q, epochs) per point")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def _read_rows(path: Path) -> list[Row]:
    """Rows of a ``--json`` file, or of its ``.partial.jsonl`` (one row a line) if the grid was cut short."""
    text = path.read_text()
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, epsilon 8, 10 sites, Dirichlet 0.5")
    ap.add_argument("--smoke", action="store_true", help="seconds: 3 sites, 1 epoch, 1 local round (smoke test only)")
    ap.add_argument("--epsilons", default="1,3,8")
    ap.add_argument("--sites", default="5,10")
    ap.add_argument("--partitions", default="iid,dirichlet:0.5")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--methods", default="central,local,distributed")
    ap.add_argument("--epochs", type=float, default=CENTRAL["epochs"], help="central/distributed epochs (steps = epochs/q)")
    ap.add_argument("--q", type=float, default=CENTRAL["q"], help="central/distributed sample rate")
    ap.add_argument("--lr", type=float, default=CENTRAL["lr"], help="central/distributed learning rate")
    ap.add_argument("--min-honest", default="1.0,0.5", help="distributed: fractions of sites assumed honest")
    ap.add_argument("--json", type=Path, help="write all rows here at the end (and append each row as it ends)")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--diagnostic-prv-sigma", action="store_true",
                    help="distributed with central's PRV sigma: NOT private at the target epsilon (rows say so)")
    ap.add_argument("--from-json", type=Path, nargs="+", help="run nothing: tabulate (and plot) these rows files")
    args = ap.parse_args()
    if args.from_json:
        rows = [row for path in args.from_json for row in _read_rows(path)]
        print(table(rows), detail_table(rows), best_table(rows), sep="\n\n")
        if args.plot:
            plot(rows, args.plot)
        return
    CENTRAL.update(epochs=args.epochs, q=args.q, lr=args.lr)
    DIAGNOSTIC["prv_sigma"] = args.diagnostic_prv_sigma
    torch.set_num_threads(1)
    if args.smoke:
        CENTRAL.update(epochs=1)
        LOCAL.update(num_rounds=1, local_epochs=1)
        args.epsilons, args.sites, args.partitions, args.seeds = "8", "3", "iid", "0"
    elif args.quick:
        args.epsilons, args.sites, args.partitions, args.seeds = "8", "10", "dirichlet:0.5", "0"
    grid = [(m, float(e), int(s), p, int(seed)) for e in args.epsilons.split(",") for s in args.sites.split(",")
            for p in args.partitions.split(",") for seed in args.seeds.split(",") for m in args.methods.split(",")]
    log = args.json.with_suffix(".partial.jsonl") if args.json else None
    rows = run(grid, [float(x) for x in args.min_honest.split(",")], log)
    print(table(rows), detail_table(rows), sep="\n\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
