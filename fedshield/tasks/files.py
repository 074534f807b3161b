"""A task's whole data set from one file: what ``fedshield simulate --data FILE`` partitions among its virtual
clients (and takes the server's test split from), in place of the task's bundled data."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .base import Dataset, Task

__all__ = ["read_task_file", "whole_dataset"]


def read_task_file(
    task: Task, path: Path, *, text_column: str | None = None, label_column: str | None = None
) -> Dataset:
    """Model inputs and labels from ``path``: the task's own reader (text), else the numeric table/image reader
    followed by the task's fixed ``preprocess``."""
    if task.read_files is not None:
        return task.read_files(Path(path), text_column or None, label_column or None)
    if text_column:
        raise ConfigError(f"--text-column applies to text tasks only, not {task.name!r}; drop it")
    from ..data.files import load_local_data

    local = load_local_data(Path(path), task.spec, label_column=label_column or None)
    x = local.x
    if task.preprocess is not None and not Path(path).is_dir():
        x = task.preprocess(x.reshape(len(x), -1)).reshape(local.x.shape)
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), local.y.astype(np.int64))


def whole_dataset(task: Task, data: str, *, text_column: str = "", label_column: str = "") -> Dataset:
    """``data`` (a file) when given, else the task's bundled data; a task with neither is a :class:`ConfigError`."""
    if data:
        return read_task_file(task, Path(data), text_column=text_column, label_column=label_column)
    if task.load_bundled is None:
        raise ConfigError(f"task {task.name!r} ships no data: pass your data set to simulate with --data FILE")
    return task.load_bundled()
