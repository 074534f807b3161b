"""Where a client's data and privacy ledger live: bundled partitions in simulation, the institution's files in
deployment. Data is loaded once per process and cached, since Flower calls the ClientApp every round."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..config import PartitionSpec
from ..protocol import RoundSettings
from ..data.partition import split_federated
from ..dataspec import Dataset
from ..device import resolve_device
from ..errors import ConfigError, DataError
from ..tasks import Task, get_task
from ..data.task_files import read_task_file, whole_dataset
from .node_config import BUDGET, DATA_PATH, DEVICE, LABEL_COLUMN, NUM_PARTITIONS, PARTITION_ID, STATE_DIR, TEXT_COLUMN
from .policy import SitePolicy, policy_from_node_config

__all__ = ["Site", "bundled_split", "load_site_files", "resolve_site"]



@dataclass(frozen=True)
class Site:
    """One client's view of the world: its data splits, its ledger directory, its own budget cap and the device
    it trains on (resolved on this machine: the node config's ``device``, else the round's). ``policy``: a deployed
    site's own privacy policy (None in simulation)."""

    name: str
    task: Task
    train: Dataset
    test: Dataset
    state_dir: Path
    budget: float | None
    partition_id: int | None
    device: torch.device = torch.device("cpu")
    policy: SitePolicy | None = None


def resolve_site(node_config: Mapping[str, Any], settings: RoundSettings) -> Site:
    policy = policy_from_node_config(node_config)
    # A deployed site's task is its own (the policy refused any other name before we got here).
    task = get_task(policy.task if policy is not None else settings.task)
    device = _device(node_config, settings)
    if policy is not None:
        if STATE_DIR not in node_config or not str(node_config[STATE_DIR]):
            raise ConfigError("node config sets data-path but no state-dir: the privacy ledger needs a home")
        path, state = Path(str(node_config[DATA_PATH])), str(node_config[STATE_DIR])
        train, test = load_site_files(task.name, str(path), str(node_config.get(LABEL_COLUMN, "") or ""), state,
                                      str(node_config.get(TEXT_COLUMN, "") or ""))
        return Site(path.name, task, train, test, Path(state), policy.max_epsilon, None, device, policy)
    budget = float(node_config[BUDGET]) if node_config.get(BUDGET) not in (None, "", 0, 0.0) else None
    if PARTITION_ID not in node_config:
        raise ConfigError(
            "this client has neither data-path (deployment) nor partition-id (simulation) in its node config: "
            "start it with `fedshield client --data FILE --state DIR`"
        )
    pid, n = int(node_config[PARTITION_ID]), int(node_config[NUM_PARTITIONS])
    if not settings.sim_state_root:
        raise ConfigError("simulation round config has no sim-state-root for the virtual clients' ledgers")
    train, test = _bundled_partition(settings.task, settings.partition, n, settings.seed, pid, settings.sim_data,
                                     settings.text_column, settings.label_column)
    state = Path(settings.sim_state_root) / f"client-{pid:04d}"
    return Site(f"client-{pid}", task, train, test, state, budget, pid, device)


def _device(node_config: Mapping[str, Any], settings: RoundSettings) -> torch.device:
    """The site's own choice wins: only it knows its hardware (the run's setting is one value for all sites)."""
    local = str(node_config.get(DEVICE, "") or "").strip()
    if not local:
        return resolve_device(settings.device)
    try:
        return resolve_device(local)
    except ConfigError as exc:
        raise ConfigError(f"this site's node config {DEVICE}={local!r}: {exc}") from None


@lru_cache(maxsize=8)
def _bundled_partition(task_name: str, partition: str, n: int, seed: int, pid: int, data: str = "",
                       text_column: str = "", label_column: str = "") -> tuple[Dataset, Dataset]:
    return bundled_split(task_name, partition, n, seed, data, text_column, label_column).clients[pid]


@lru_cache(maxsize=2)
def bundled_split(task_name: str, partition: str, n: int, seed: int, data: str = "",  # type: ignore[no-untyped-def]
                  text_column: str = "", label_column: str = ""):
    # The task's bundled data, or the file simulate was given with --data (data.task_files)
    dataset = whole_dataset(get_task(task_name), data, text_column=text_column, label_column=label_column)
    return split_federated(dataset, PartitionSpec.parse(partition), n, seed)


@lru_cache(maxsize=2)
def load_site_files(task_name: str, path: str, label_column: str, state_dir: str,
                     text_column: str = "") -> tuple[Dataset, Dataset]:
    """The site's records, split by the site's own seed kept in its state directory (:mod:`.split`)."""
    from .split import data_fingerprint, site_split

    data = read_task_file(get_task(task_name), Path(path), text_column=text_column or None,
                          label_column=label_column or None)
    if len(data) < 4:
        raise DataError(f"{path} has {len(data)} records; a client needs at least 4 (train and test)")
    train_idx, test_idx = site_split(Path(state_dir), data_fingerprint(data.x, data.y), len(data))
    return data.subset(train_idx), data.subset(test_idx)
