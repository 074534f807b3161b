"""The stock side of ``sim_throughput.py``: a ServerApp and ClientApp written the way Flower's own Opacus example
is (Message API), loading fedshield's partitions per call, and the engine settings both apps run with.

Split out of ``sim_throughput.py`` (one job per file): that script measures; this one is the baseline it measures
against. Ray workers import it by name (``sim_throughput.py`` puts ``benchmarks/`` on their ``PYTHONPATH``).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

FRACTION_TRAIN = 0.1


_PARTITIONER: dict[tuple[str, int, int], Any] = {}  # the example's global `fds`: built once per process


def load_partition(task: str, num_partitions: int, seed: int, pid: int) -> tuple[Any, Any]:
    """Client ``pid``'s ``(train, test)``: exactly what fedshield's ``split_federated`` gives it (iid), but loaded
    per call from a partitioner cached per process, as Flower's Opacus example does."""
    from fedshield.data import partition as fp
    from fedshield.tasks import get_task

    key = (task, num_partitions, seed)
    if key not in _PARTITIONER:
        from datasets import Dataset as HFDataset
        from flwr_datasets.partitioner import IidPartitioner

        data = get_task(task).load_bundled()
        _, pool_idx = fp._stratified_split(data.y, fp.SERVER_TEST_FRACTION, np.random.default_rng(seed))
        pool = data.subset(pool_idx)
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = HFDataset.from_dict({"row": np.arange(len(pool)), "label": pool.y})
        _PARTITIONER[key] = (pool, partitioner)
    pool, partitioner = _PARTITIONER[key]
    part = pool.subset(np.sort(np.asarray(partitioner.load_partition(pid)["row"], dtype=np.int64)))
    train_idx, test_idx = fp._random_split(len(part), fp.CLIENT_TEST_FRACTION, np.random.default_rng([seed, pid]))
    return part.subset(train_idx), part.subset(test_idx)



def backend_config(ray_tmp: str) -> dict[str, Any]:
    """What ``fedshield.simulation.run.simulate`` passes to ``run_simulation`` with its defaults."""
    init_args = {"include_dashboard": False, "configure_logging": True, "logging_level": logging.WARNING,
                 "log_to_driver": False, "_temp_dir": ray_tmp}
    return {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}, "init_args": init_args}


def stock_apps(
    base: Any, sigma: float, stamps: list[float], trained: list[int], errors: list[str],
) -> tuple[Any, Any]:
    """A ServerApp and ClientApp as Flower's Opacus example writes them (Message API), with fedshield's settings."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from opacus import PrivacyEngine

    from fedshield.tasks import get_task

    n, rounds, seed, fraction_evaluate = base.num_clients, base.num_rounds, base.seed, base.fraction_evaluate
    task, lr, q, epochs = base.task, base.lr, base.sample_rate, base.local_epochs
    max_grad_norm, delta = base.max_grad_norm, base.delta

    def loader(data: Any, batch_size: int, shuffle: bool) -> Any:
        tensors = torch.utils.data.TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
        return torch.utils.data.DataLoader(tensors, batch_size=batch_size, shuffle=shuffle)

    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)  # as the example does
        pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
        train_set, _ = load_partition(task, parts, seed, pid)
        model = get_task(task).new_model(seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        # len(loader) = 1/q batches, so Opacus' Poisson sampling uses fedshield's sample rate.
        train_loader = loader(train_set, math.ceil(len(train_set) * q), shuffle=True)
        privacy_engine = PrivacyEngine(secure_mode=False)
        dp_model, optimizer, train_loader = privacy_engine.make_private(
            module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
        )
        criterion = torch.nn.CrossEntropyLoss()
        losses = []
        for _ in range(epochs):
            for images, labels in train_loader:
                optimizer.zero_grad()
                loss = criterion(dp_model(images), labels)
                loss.backward()
                optimizer.step()
                losses.append(float(loss))
        epsilon = privacy_engine.get_epsilon(delta=delta)
        metrics = {"train_loss": float(np.mean(losses)) if losses else 0.0, "epsilon": float(epsilon),
                   "num-examples": len(train_set)}
        content = RecordDict({"arrays": ArrayRecord(torch_state_dict=model.state_dict()),
                              "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
        _, test_set = load_partition(task, parts, seed, pid)
        model = get_task(task).new_model(seed)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        criterion, correct, loss = torch.nn.CrossEntropyLoss(), 0, 0.0
        with torch.no_grad():
            for images, labels in loader(test_set, 32, shuffle=False):
                outputs = model(images)
                loss += float(criterion(outputs, labels))
                correct += int((outputs.argmax(1) == labels).sum())
        metrics = {"eval_loss": loss, "eval_acc": correct / len(test_set), "num-examples": len(test_set)}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    class CountingFedAvg(FedAvg):  # counts the replies that trained; aggregation itself is FedAvg's
        def aggregate_train(self, server_round: int, replies: Any) -> Any:
            replies = list(replies)
            trained.append(sum(not m.has_error() for m in replies))
            errors.extend(f"round {server_round}: {m.error.reason[-300:]}" for m in replies if m.has_error())
            return super().aggregate_train(server_round, replies)

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        # min_available_nodes: the ServerApp starts before the simulation has registered every node.
        strategy = CountingFedAvg(fraction_train=FRACTION_TRAIN, fraction_evaluate=fraction_evaluate,
                                  min_available_nodes=n)
        initial = ArrayRecord(torch_state_dict=get_task(task).new_model(seed).state_dict())

        def stamp(_round: int, _arrays: ArrayRecord) -> None:
            stamps.append(time.perf_counter())

        strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, train_config=ConfigRecord({"lr": lr}),
                       evaluate_fn=stamp)

    return server, client


def run_stock(base: Any, ray_tmp: str) -> dict[str, Any]:
    """Run the stock apps with the settings of ``base`` (a fedshield RunConfig, DP on, SecAgg+ off)."""
    from flwr.simulation import run_simulation

    from fedshield.server.runner import noise_multiplier_for

    n, rounds = base.num_clients, base.num_rounds
    sigma = noise_multiplier_for(base)
    stamps: list[float] = []
    trained: list[int] = []
    errors: list[str] = []
    server, client = stock_apps(base, sigma, stamps, trained, errors)
    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=backend_config(ray_tmp))
    if len(stamps) != rounds + 1:
        raise RuntimeError(f"stock: expected {rounds + 1} evaluate_fn calls, got {len(stamps)}: the run failed")
    sampled = max(int(n * FRACTION_TRAIN), 2)  # FedAvg's sample size
    return {"round_s": [b - a for a, b in zip(stamps, stamps[1:])], "trained": trained,
            "failed": [sampled - t for t in trained], "errors": errors[:5], "sigma": sigma}
