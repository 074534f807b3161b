"""Per-round wall time of a real deployment on loopback: plain vs SecAgg+, beside a stock-Flower echo app, and how
much of a round is the clients' actual work. Usage::

    python benchmarks/deploy_overhead.py [--clients 3 10] [--rounds 3] [--no-worker] [--flower-polling] [--stock [N ...]]
                                         [--before [N ...]] [--json OUT]

One SuperLink (TLS + node authentication) and N SuperNodes started through ``fedshield.deploy.coordinator`` /
``fedshield.deploy.site``, each site with its own slice of the digits as a CSV file. For each N, four runs
on the same processes:

* ``echo``: ``tests/apps/echo_app``, stock Flower (FedAvg, numpy only, one train message per node and round): the
  floor that Flower 1.39's polling and process-per-message design sets;
* ``plain``: fedshield, DP-SGD at the default settings, updates in clear: one train message per node and round,
  which also carries the federated evaluation of the previous round's model; the last round adds one evaluate
  message (``fedshield.strategies.recording``);
* ``secagg``: the same with SecAgg+ (four train-stage messages per node and round, the last round one more);
* ``plain, separate eval`` and ``SecAgg+, separate eval``: the same with ``separate_evaluation`` (an evaluate
  message per node and round, as fedshield ran before the evaluation rode in the train message): before and after
  in one invocation;
* ``plain, no fed. eval``: plain with ``fraction_evaluate=0`` (only the server's test set scores the model): one
  message per node and round, as the echo app sends.

Round time is ``round_time_s`` from ``metrics.jsonl`` (the echo app reports its own). "Client work" is what a
round's training and evaluation cost on one site, measured in this process with the same code and settings
(``train_round`` + ``evaluate_round``); nothing is added to what clients send. The rest of a round is overhead:
process starts, imports, polling. ``flwr-clientapp`` processes are counted from the SuperNodes' logs and timed
from ``/proc`` while a run goes (first and last time each was seen, 50 ms sampling).

``--stock`` (for every N, or ``--stock 3`` for those listed) also runs the same four on a second set of processes the way stock Flower 1.39 runs them (Flower's own
poll intervals, no warm worker: ``--flower-polling --no-worker``), so fedshield and stock Flower are measured in
the same invocation.

``--before`` (for every N, or for those listed) also runs the same four on a second set of processes as fedshield
ran them before its SuperNodes answered SecAgg+'s key and unmask stages themselves (``FEDSHIELD_NODE_STAGES=0``:
every message gets a ``flwr-clientapp`` process; ``fedshield.deploy.node_stages``), so before and after come from one
invocation. (Until stop 32 it compared with the pulls answered at once, ``FEDSHIELD_HELD_PULLS=0``; before stop 31
with f22ea59's CPU cuts; those rows stay in RESULTS.md.)

Every fedshield run starts on fresh site ledgers and must train on every site in every round (else it fails):
see :func:`fresh_ledgers`. ``CPU s/rnd`` is the CPU time of every process of the deployment (and of this one, where
the sites' warm workers train) from submit to finish, divided by the rounds: on a shared machine it measures what
a round costs, where wall time also measures the neighbours.

``--json OUT`` writes rows ``{name, ours, baseline, unit, ratio, detail}``: each fedshield run's median round time
(rounds 2..R) against the echo app's, measured on the same processes; with ``--stock``, also each fedshield run's
round time and its overhead outside training (round time minus the client work) against stock Flower's.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from _deploy_procs import ClientAppWatcher, CpuSampler

from fedshield.deploy.site import ClientOptions, FedshieldClient, start_client
from fedshield.config import RunConfig
from fedshield.crypto import init_keys
from fedshield.deploy import free_port, run_app
from fedshield.deploy.coordinator import FedshieldServer, ServerOptions, start_server
from fedshield.privacy.ledger import LEDGER_FILE

ECHO_APP = Path(__file__).resolve().parents[1] / "tests" / "apps" / "echo_app"


@dataclass
class Measured:
    label: str
    rounds: list[float]
    processes: int
    lifetimes: list[float]
    cpu: dict[str, float] = field(default_factory=dict)  # CPU-s of the whole run (submit to finish) by process kind

    @property
    def cpu_per_round(self) -> float:
        """Every process's CPU for the whole run (start-up and finish included), divided by the rounds."""
        return sum(self.cpu.values()) / len(self.rounds)

    @property
    def steady(self) -> float:
        """Median round time after the first (which also pays for the ServerApp's first imports)."""
        later = self.rounds[1:] or self.rounds
        return statistics.median(later)

    @property
    def mean(self) -> float:
        """Mean round time after the first: with the evaluation folded, the last round's own evaluate message is
        in it, where the median leaves it out."""
        later = self.rounds[1:] or self.rounds
        return statistics.fmean(later)


def write_sites(root: Path, n: int) -> list[Path]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    header = ",".join([f"p{i}" for i in range(64)] + ["label"])
    paths = []
    for i, part in enumerate(np.array_split(np.random.default_rng(0).permutation(len(digits.target)), n), 1):
        paths.append(root / f"site-{i}.csv")
        np.savetxt(paths[-1], np.column_stack([digits.data[part].astype(int), digits.target[part]]), delimiter=",",
                   header=header, comments="", fmt="%d")
    return paths


def client_work(data: Path, config: RunConfig, seconds: list[float]) -> None:
    """One site's training and evaluation for one round, in this process (warm imports, like a best case)."""
    from fedshield.client.site import resolve_site
    from fedshield.client.trainer import evaluate_round, train_round
    from fedshield.protocol import RoundSettings
    from fedshield.server.runner import noise_multiplier_for
    from fedshield.tasks import get_task

    with tempfile.TemporaryDirectory() as state:
        settings = RoundSettings(
            run_id="bench", server_round=1, num_rounds=config.num_rounds, task=config.task, partition="iid",
            seed=0, local_epochs=config.local_epochs, lr=config.lr, sample_rate=config.sample_rate, dp=config.dp,
            noise_multiplier=noise_multiplier_for(config), max_grad_norm=config.max_grad_norm, target_epsilon=0.0,
            delta=config.delta, accountant=config.accountant, grad_sample_mode=config.grad_sample_mode,
        )
        site = resolve_site({"data-path": str(data), "state-dir": state, "task": config.task, "max-epsilon": 1000.0},
                            settings)
        state_dict = get_task(config.task).new_model(0).state_dict()
        for repeat in range(4):
            start = time.perf_counter()
            settings = RoundSettings(**{**settings.__dict__, "server_round": repeat + 1})
            outcome = train_round(site, settings, state_dict)
            evaluate_round(site, settings, outcome.state_dict)
            if repeat:  # the first pays for imports and Opacus set-up
                seconds.append(time.perf_counter() - start)


def fresh_ledgers(states: list[Path]) -> None:
    """Each run starts on fresh site ledgers, as a new deployment would. A site's ledger spans runs and the
    server's target epsilon caps it, so on one ledger every run after the first was refused ("budget-exhausted")
    and trained nothing: the rows of 2026-12-03 10:15 timed SecAgg+ and "no fed. eval" rounds without training."""
    for state in states:
        (state / LEDGER_FILE).unlink(missing_ok=True)


def run_fedshield(server: FedshieldServer, watcher: ClientAppWatcher, label: str, config: RunConfig,
                  states: list[Path]) -> Measured:
    fresh_ledgers(states)
    with watcher.watching(), CpuSampler().measure() as cpu:
        run_id = server.submit(config)
        result = server.follow(run_id, config, status_every_s=5.0, timeout=1800)
    if not result.completed:
        raise RuntimeError(f"{label}: {result.status} {result.details}\n{result.log[-2000:]}")
    rows = [json.loads(x) for x in (config.out / "metrics.jsonl").read_text().splitlines()]
    idle = [(r["round"], r["clients_trained"]) for r in rows if r["clients_trained"] != config.num_clients]
    if idle:  # a round whose sites refused or failed is not the round this benchmark times
        raise RuntimeError(f"{label}: (round, sites that trained) {idle} of {config.num_clients} sites")
    return Measured(label, [r["round_time_s"] for r in rows], watcher.started, watcher.lifetimes(), cpu)


def run_echo(server: FedshieldServer, watcher: ClientAppWatcher, rounds: int, out: Path) -> Measured:
    with watcher.watching(), CpuSampler().measure() as cpu:
        result = run_app(ECHO_APP, server.superlink.connection, run_config={"num-rounds": rounds,
                                                                            "out-file": str(out)}, timeout=1800)
    if not result.completed:
        raise RuntimeError(f"echo: {result.status} {result.details}")
    seconds = json.loads(out.read_text())["seconds"]
    return Measured("echo (stock Flower)", [seconds / rounds] * rounds, watcher.started, watcher.lifetimes(), cpu)


def bench(n: int, rounds: int, root: Path, *, worker: bool = True) -> tuple[list[Measured], float]:
    root.mkdir(parents=True, exist_ok=True)
    keys = init_keys(root / "keys", server_hosts=["127.0.0.1"], nodes=n)
    sites = write_sites(root, n)
    options = ServerOptions(keys=keys.directory, fleet_address=f"127.0.0.1:{free_port()}", control_port=free_port())
    server = start_server(options, home=root / "superlink")
    clients: list[FedshieldClient] = []
    try:
        for i, data in enumerate(sites, 1):
            clients.append(start_client(ClientOptions(
                server=server.superlink.fleet_address, data=data, state_dir=root / f"state-{i}",
                ca_cert=keys.ca_cert, node_key=keys.node(f"node-{i}").private_key_path, allow_plain_updates=True,
                roster=keys.authorized_nodes, warm_worker=worker,
                # The stock echo app (its ClientApp ships in its bundle) on the same SuperNodes, and a fresh ledger
                # for every run (fresh_ledgers): a benchmark's sites, not a deployment's.
                max_epsilon=1000.0, site_code_only=False)))
        watcher = ClientAppWatcher(clients)
        base = RunConfig(num_clients=n, num_rounds=rounds, epsilon=8.0)
        work: list[float] = []
        client_work(sites[0], base, work)
        states = [root / f"state-{i}" for i in range(1, n + 1)]
        results = [
            run_echo(server, watcher, rounds, root / "echo.json"),
            run_fedshield(server, watcher, "fedshield plain", base.replace(secagg=False, out=root / "plain"), states),
            run_fedshield(server, watcher, "fedshield SecAgg+", base.replace(secagg=True, out=root / "secagg"), states),
            run_fedshield(server, watcher, "fedshield plain, separate eval",
                          base.replace(secagg=False, separate_evaluation=True, out=root / "plain-sep"), states),
            run_fedshield(server, watcher, "fedshield SecAgg+, separate eval",
                          base.replace(secagg=True, separate_evaluation=True, out=root / "secagg-sep"), states),
            run_fedshield(server, watcher, "fedshield plain, no fed. eval",
                          base.replace(secagg=False, fraction_evaluate=0.0, out=root / "plain-no-eval"), states),
        ]
        return results, statistics.median(work)
    finally:
        for client in clients:
            client.stop()
        server.close()


#: Flower 1.39's own poll intervals (SuperNode idle 3 s, SuperExec 1 s), read by every SuperNode and SuperExec.
STOCK_ENV = {"FEDSHIELD_SUPERNODE_POLL_S": "3", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "1.0",
             "FEDSHIELD_SUPERNODE_QUICK": "0", "FEDSHIELD_CLIENTAPP_ZYGOTE_ON": "0"}
#: fedshield before its SuperNodes answered SecAgg+'s key and unmask stages (read by every SuperNode launcher,
#: fedshield.deploy.supernode_main, at its start).
BEFORE_ENV = {"FEDSHIELD_NODE_STAGES": "0"}


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set env vars for the processes started inside (SuperNodes and SuperExecs read them at start)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def print_results(n: int, label: str, results: list[Measured], work: float, rounds: int) -> None:
    echo = results[0].steady
    for m in results:
        life = statistics.median(m.lifetimes) if m.lifetimes else float("nan")
        own = 0.0 if m.label.startswith("echo") else work
        print(f"{n:>7} {label + m.label:<36} {m.rounds[0]:>9.1f} {m.steady:>8.1f} {m.mean:>7.1f} {m.steady / echo:>7.1f} "
              f"{m.processes / rounds:>14.1f} {life:>16.1f} {own:>7.2f} {m.steady - own:>10.1f} "
              f"{m.cpu_per_round:>9.1f}", flush=True)
        top = sorted(m.cpu.items(), key=lambda kv: -kv[1])[:6]
        print(f"{'':>9}CPU-s per run: " + ", ".join(f"{k} {v:.1f}" for k, v in top), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[3])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-worker", action="store_true",
                        help="train inside each flwr-clientapp process (what the warm worker saves)")
    parser.add_argument("--before", type=int, nargs="*", metavar="N",
                        help="also run everything as fedshield ran it before its SuperNodes answered SecAgg+'s key "
                             "and unmask stages (a ClientApp for every message) and compare: for every --clients "
                             "value, or only for the N given")
    parser.add_argument("--flower-polling", action="store_true",
                        help="Flower 1.39's own poll intervals (SuperNode idle 3 s, SuperExec 1 s): stock Flower")
    parser.add_argument("--stock", type=int, nargs="*", metavar="N",
                        help="also run everything as stock Flower 1.39 (its polling, no worker) and compare: for "
                             "every --clients value, or only for the N given")
    parser.add_argument("--json", metavar="OUT", help="write machine-readable rows here")
    args = parser.parse_args()
    if args.stock is not None and (args.flower_polling or args.no_worker):
        parser.error("--stock already runs the stock configuration beside fedshield's: drop --flower-polling/--no-worker")
    if args.flower_polling:  # read by fedshield.deploy.supernode_main and by every SuperExec we start
        os.environ.update(STOCK_ENV)
    logging.getLogger("flwr").setLevel(logging.ERROR)
    print(f"{os.cpu_count()} CPUs; digits CNN, DP-SGD eps 8 (q=0.5, 2 local epochs), TLS + node auth, loopback; "
          f"warm worker {'OFF' if args.no_worker else 'on'}; polling {'Flower 1.39' if args.flower_polling else 'fedshield'}")
    header = (f"{'clients':>7} {'run':<36} {'round 1 s':>9} {'later s':>8} {'mean s':>7} {'x echo':>7} {'clientapps/rnd':>14} "
              f"{'clientapp life s':>16} {'work s':>7} {'overhead s':>10} {'CPU s/rnd':>9}")
    print(header)
    rows: list[dict[str, Any]] = []
    for n in args.clients:
        with tempfile.TemporaryDirectory(prefix="fsbench-") as tmp:
            start = time.monotonic()
            results, work = bench(n, args.rounds, Path(tmp) / "ours", worker=not args.no_worker)
            print_results(n, "", results, work, args.rounds)
            rows += json_rows(n, results, work, args)
            if args.before is not None and (not args.before or n in args.before):
                with environment(BEFORE_ENV):
                    before, before_work = bench(n, args.rounds, Path(tmp) / "before", worker=not args.no_worker)
                print_results(n, "before: ", before, before_work, args.rounds)
                rows += compare_rows(n, results, work, before, before_work, BEFORE_NOTE, "before this change")
            if args.stock is not None and (not args.stock or n in args.stock):
                with environment(STOCK_ENV):
                    stock, stock_work = bench(n, args.rounds, Path(tmp) / "stock", worker=False)
                print_results(n, "stock: ", stock, stock_work, args.rounds)
                rows += stock_rows(n, results, work, stock, stock_work)
            print(f"{'':>7} (all runs for {n} clients: {time.monotonic() - start:.0f} s wall)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")


def json_rows(n: int, results: list[Measured], work: float, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Each fedshield run's steady round time against the stock-Flower echo app's, same processes."""
    echo = results[0]
    later = "rounds 2..R" if len(echo.rounds) > 1 else "round 1 (only one round)"
    by_label = {m.label: m for m in results}
    plain, secagg = by_label["fedshield plain"], by_label["fedshield SecAgg+"]
    secagg_row = {
        "name": f"fedshield SecAgg+ vs plain round time, {n} clients", "ours": secagg.steady, "baseline": plain.steady,
        "unit": "s/round", "ratio": secagg.steady / plain.steady, "detail": {
            "better": "lower", "repeats": len(secagg.rounds), "ours_runs": secagg.rounds, "baseline_runs": plain.rounds,
            "note": f"median of {later}; same processes, same DP-SGD work; goal <= 1.5x"}}
    folded = [{
        "name": f"{m.label} vs {m.label}, separate eval round time, {n} clients", "ours": m.steady,
        "baseline": by_label[f"{m.label}, separate eval"].steady,
        "unit": "s/round", "ratio": m.steady / by_label[f"{m.label}, separate eval"].steady, "detail": {
            "better": "lower", "repeats": len(m.rounds), "ours_runs": m.rounds,
            "baseline_runs": by_label[f"{m.label}, separate eval"].rounds,
            "ours_mean": m.mean, "baseline_mean": by_label[f"{m.label}, separate eval"].mean,
            "note": f"median of {later}; federated evaluation in the next round's train message vs its own message"}}
        for m in (plain, secagg)]
    return [secagg_row, *folded] + [{
        "name": f"{m.label} vs echo (stock Flower) round time, {n} clients", "ours": m.steady, "baseline": echo.steady,
        "unit": "s/round", "ratio": m.steady / echo.steady, "detail": {
            "better": "lower", "repeats": len(m.rounds), "ours_runs": m.rounds, "baseline_runs": echo.rounds,
            "clientapps_per_round": m.processes / args.rounds, "client_work_s": work, "warm_worker": not args.no_worker,
            "flower_polling": args.flower_polling,
            "note": f"median of {later}; the echo app trains nothing, fedshield does DP-SGD ({work:.2f} s of work)",
        },
    } for m in results[1:]]


STOCK_NOTE = ("median of rounds 2..R; baseline: the same app with Flower's own polling and no warm worker, on its "
              "own processes, in the same invocation")
BEFORE_NOTE = ("median of rounds 2..R; baseline: the same app on its own processes in the same invocation, as fedshield "
               "ran it before its SuperNodes answered SecAgg+'s key and unmask stages (FEDSHIELD_NODE_STAGES=0)")


def compare_rows(n: int, ours: list[Measured], work: float, base: list[Measured], base_work: float, note: str,
                 against: str) -> list[dict[str, Any]]:
    """fedshield's round time and overhead against the same app run another way (stock Flower, or as before)."""
    rows = []
    for m, s in zip(ours[1:], base[1:], strict=True):
        detail = {"better": "lower", "repeats": len(m.rounds), "ours_runs": m.rounds, "baseline_runs": s.rounds,
                  "client_work_s": work, "baseline_client_work_s": base_work}
        rows.append({
            "name": f"{m.label} round time vs {against}, {n} clients", "ours": m.steady, "baseline": s.steady,
            "unit": "s/round", "ratio": m.steady / s.steady, "detail": {**detail, "note": note}})
        if m.cpu and s.cpu:  # both sides sampled (rows read back from before the sampler have none)
            rows.append({
                "name": f"{m.label} CPU per round vs {against}, {n} clients", "ours": m.cpu_per_round,
                "baseline": s.cpu_per_round, "unit": "CPU-s/round", "ratio": m.cpu_per_round / s.cpu_per_round,
                "detail": {**detail, "note": "every process's CPU from submit to finish / rounds", "ours_cpu": m.cpu,
                           "baseline_cpu": s.cpu}})
        over, base_over = max(m.steady - work, 1e-9), max(s.steady - base_work, 1e-9)
        rows.append({
            "name": f"{m.label} overhead outside training vs {against}, {n} clients", "ours": over,
            "baseline": base_over, "unit": "s/round", "ratio": over / base_over,
            "detail": {**detail, "note": "round time minus one site's measured train + evaluate work; goal <= 2 s"}})
    return rows


def stock_rows(n: int, ours: list[Measured], work: float, stock: list[Measured], stock_work: float
               ) -> list[dict[str, Any]]:
    """fedshield's round time and overhead against the same app run as stock Flower 1.39 would run it."""
    return compare_rows(n, ours, work, stock, stock_work, STOCK_NOTE, "stock Flower 1.39")


if __name__ == "__main__":
    main()
