"""The federated split: IID computed without Hugging Face equals flwr-datasets' ``IidPartitioner`` row for row, and
the server's test set is the same rows whatever the partition."""

from __future__ import annotations

import numpy as np
import pytest

from fedshield.config import PartitionSpec
from fedshield.data.partition import iid_indices, server_test_split, split_federated
from fedshield.dataspec import Dataset


@pytest.mark.parametrize(("size", "n"), [(1, 1), (10, 3), (1437, 5), (1437, 100), (1000, 10), (7, 7)])
def test_iid_indices_equal_flwr_datasets_iid_partitioner(size: int, n: int) -> None:
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import IidPartitioner

    partitioner = IidPartitioner(num_partitions=n)
    partitioner.dataset = HFDataset.from_dict({"row": np.arange(size)})
    theirs = [np.asarray(partitioner.load_partition(i)["row"]) for i in range(n)]
    ours = iid_indices(size, n)
    assert len(ours) == n
    for mine, flower in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(mine, flower)
    np.testing.assert_array_equal(np.concatenate(ours), np.arange(size))  # every row once, in order


def _data(size: int = 300, classes: int = 3) -> Dataset:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(size, 4)).astype(np.float32)
    return Dataset(x, (np.arange(size) % classes).astype(np.int64))


@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5", "shard:2"])
def test_server_test_split_is_split_federateds_server_test_for_any_partition(partition: str) -> None:
    data = _data()
    split = split_federated(data, PartitionSpec.parse(partition), 4, seed=7)
    alone = server_test_split(data, seed=7)
    np.testing.assert_array_equal(alone.x, split.server_test.x)
    np.testing.assert_array_equal(alone.y, split.server_test.y)
    # and the clients' rows are the rest, each row once
    rows = [len(train) + len(test) for train, test in split.clients]
    assert sum(rows) + len(alone) == len(data)
    assert not np.array_equal(server_test_split(data, seed=8).x, alone.x)  # the seed matters
