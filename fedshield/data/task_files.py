"""A task's records from one file: a site's own data (``fedshield client --data``), or what ``fedshield simulate
--data FILE`` partitions among its virtual clients (and takes the server's test split from) in place of the task's
bundled data.

The task (:class:`fedshield.tasks.base.Task`, duck-typed here: data sits beside tasks, not above them) says how its
records become model inputs: a fixed text encoder (``encode_texts``) reads a table's text column, else the numeric
table / image-folder reader and the task's fixed ``preprocess``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..dataspec import Dataset, DataSpec
from ..errors import ConfigError
from .files import load_local_data
from .text_files import load_text_table

__all__ = ["TaskData", "read_task_file", "whole_dataset"]


class TaskData(Protocol):
    """What reading a task's files needs of the task."""

    @property
    def name(self) -> str: ...

    spec: DataSpec
    load_bundled: Callable[[], Dataset] | None
    preprocess: Callable[[np.ndarray], np.ndarray] | None
    encode_texts: Callable[[list[str]], np.ndarray] | None


def read_task_file(
    task: TaskData, path: Path, *, text_column: str | None = None, label_column: str | None = None
) -> Dataset:
    """Model inputs and labels from ``path``: a text table's column through the task's text encoder, else the
    numeric table/image reader followed by the task's fixed ``preprocess``."""
    if task.encode_texts is not None:
        texts, labels = load_text_table(Path(path), task.spec, text_column=text_column or None,
                                        label_column=label_column or None)
        return Dataset(task.encode_texts(texts), labels)
    if text_column:
        raise ConfigError(f"--text-column applies to text tasks only, not {task.name!r}; drop it")
    local = load_local_data(Path(path), task.spec, label_column=label_column or None)
    x = local.x
    if task.preprocess is not None and not Path(path).is_dir():
        x = task.preprocess(x.reshape(len(x), -1)).reshape(local.x.shape)
    return Dataset(np.ascontiguousarray(x, dtype=np.float32), local.y.astype(np.int64))


def whole_dataset(task: TaskData, data: str, *, text_column: str = "", label_column: str = "") -> Dataset:
    """``data`` (a file) when given, else the task's bundled data; a task with neither is a :class:`ConfigError`."""
    if data:
        return read_task_file(task, Path(data), text_column=text_column, label_column=label_column)
    if task.load_bundled is None:
        raise ConfigError(f"task {task.name!r} ships no data: pass your data set to simulate with --data FILE")
    return task.load_bundled()
