"""Seeded, reproducible splits of a bundled data set across simulated clients.

The split is a pure function of (data, partition spec, number of clients, seed): every Ray worker recomputes the
same partition independently, so no data ever has to be shipped between processes. The partitioners are
flwr-datasets' own, run over a local ``datasets.Dataset`` (``FederatedDataset`` would need the Hugging Face hub),
except IID: flwr-datasets' ``IidPartitioner`` is Hugging Face's contiguous ``shard``, three lines of arithmetic
computed here (equal to it, ``tests/test_partition.py``) so that the default split does not import ``datasets``
and ``flwr_datasets`` (~3 CPU-s in every process that splits).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import PartitionSpec
from ..errors import ConfigError
from ..dataspec import Dataset

__all__ = ["FederatedSplit", "iid_indices", "split_federated", "server_test_split", "MIN_CLIENT_EXAMPLES"]

#: A client needs at least this many examples to have both a train and a test split worth the name.
MIN_CLIENT_EXAMPLES = 4
SERVER_TEST_FRACTION = 0.2
CLIENT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class FederatedSplit:
    """The server's held-out test set and each client's ``(train, test)`` split."""

    server_test: Dataset
    clients: tuple[tuple[Dataset, Dataset], ...]


def server_test_split(data: Dataset, seed: int) -> Dataset:
    """The server's held-out test set of :func:`split_federated` (the same rows for any partition and client
    count), without partitioning the rest."""
    server_idx, _ = _stratified_split(data.y, SERVER_TEST_FRACTION, np.random.default_rng(seed))
    return data.subset(server_idx)


def split_federated(data: Dataset, spec: PartitionSpec, num_clients: int, seed: int) -> FederatedSplit:
    """Hold out a stratified server test set, partition the rest, then split each partition into train/test."""
    rng = np.random.default_rng(seed)
    server_idx, pool_idx = _stratified_split(data.y, SERVER_TEST_FRACTION, rng)
    pool = data.subset(pool_idx)
    if num_clients * MIN_CLIENT_EXAMPLES > len(pool):
        raise ConfigError(
            f"{num_clients} clients need at least {num_clients * MIN_CLIENT_EXAMPLES} training examples "
            f"({MIN_CLIENT_EXAMPLES} each) but only {len(pool)} are left after the server's test set: "
            f"use --clients {max(1, len(pool) // MIN_CLIENT_EXAMPLES)} or fewer"
        )
    parts = _partition_indices(pool, spec, num_clients, seed)
    clients = []
    for cid, idx in enumerate(parts):
        if len(idx) < 2:
            raise ConfigError(
                f"partition {spec} gave client {cid} only {len(idx)} examples: "
                "use fewer clients or a less skewed partition (larger Dirichlet alpha, more shards)"
            )
        part = pool.subset(np.sort(idx))
        client_rng = np.random.default_rng([seed, cid])
        train_idx, test_idx = _random_split(len(part), CLIENT_TEST_FRACTION, client_rng)
        clients.append((part.subset(train_idx), part.subset(test_idx)))
    return FederatedSplit(data.subset(server_idx), tuple(clients))


def iid_indices(size: int, n: int) -> list[np.ndarray]:
    """flwr-datasets' ``IidPartitioner`` over ``size`` rows: Hugging Face's ``shard(n, i, contiguous=True)``, the
    first ``size % n`` parts one row longer."""
    div, mod = divmod(size, n)
    starts = [div * i + min(i, mod) for i in range(n)]
    return [np.arange(start, start + div + (1 if i < mod else 0), dtype=np.int64) for i, start in enumerate(starts)]


def _partition_indices(pool: Dataset, spec: PartitionSpec, n: int, seed: int) -> list[np.ndarray]:
    if spec.kind == "iid":
        return iid_indices(len(pool), n)
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner, ShardPartitioner

    hf = HFDataset.from_dict({"row": np.arange(len(pool)), "label": pool.y})
    if spec.kind == "dirichlet":
        min_size = max(2, min(10, len(pool) // (2 * n)))
        partitioner = DirichletPartitioner(
            num_partitions=n, partition_by="label", alpha=float(spec.param or 0), min_partition_size=min_size,
            self_balancing=True, seed=seed,
        )
    elif spec.kind == "shard":
        partitioner = ShardPartitioner(
            num_partitions=n, partition_by="label", num_shards_per_partition=int(spec.param or 1), seed=seed,
        )
    else:  # PartitionSpec.parse already rejects this; kept so a new kind cannot silently fall through
        raise ConfigError(f"unknown partition kind {spec.kind!r}")
    partitioner.dataset = hf
    try:
        return [np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64) for i in range(n)]
    except ValueError as exc:
        raise ConfigError(
            f"partition {spec} cannot split {len(pool)} examples over {n} clients ({exc}): "
            "use fewer clients or a less skewed partition"
        ) from None


def _stratified_split(y: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    held, rest = [], []
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        k = int(round(len(idx) * fraction))
        held.append(idx[:k])
        rest.append(idx[k:])
    return np.sort(np.concatenate(held)), np.sort(np.concatenate(rest))


def _random_split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    perm = rng.permutation(n)
    k = max(1, int(round(n * fraction)))
    return np.sort(perm[k:]), np.sort(perm[:k])
