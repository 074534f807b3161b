"""What a task expects of its data; the contract every data source is checked against."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

__all__ = ["DataSpec", "Dataset"]


@dataclass(frozen=True)
class DataSpec:
    """Shape of one example and the label set a task trains on.

    Attributes:
        name: the task's name, used in error messages.
        input_shape: shape of one example as the model consumes it, e.g. ``(1, 8, 8)`` or ``(30,)``.
        num_classes: labels are the integers ``0 .. num_classes - 1``.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int

    def __post_init__(self) -> None:
        if not self.input_shape or any(d <= 0 for d in self.input_shape):
            raise ConfigError(f"task {self.name!r}: input_shape must be positive dimensions, got {self.input_shape}")
        if self.num_classes < 2:
            raise ConfigError(f"task {self.name!r}: num_classes must be >= 2, got {self.num_classes}")

    @property
    def num_features(self) -> int:
        """Number of values in one example once flattened."""
        n = 1
        for d in self.input_shape:
            n *= d
        return n


@dataclass(frozen=True)
class Dataset:
    """Examples and labels in memory, already preprocessed to the model's input shape."""

    x: np.ndarray  # float32, (n, *input_shape)
    y: np.ndarray  # int64, (n,)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.x[index], self.y[index])
