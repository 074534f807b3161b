"""The Task protocol: what fedshield needs to know about a model and its data.

Built-in tasks and a user's own (``--task my_pkg.module:build_task``) go through this one interface, so the
training loop, the DP wrapper and the server never special-case a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..dataspec import DataSpec, Dataset
from ..errors import ConfigError

__all__ = ["Task", "Dataset"]


@dataclass(frozen=True)
class Task:
    """A model factory and the data contract it trains on.

    Attributes:
        spec: input shape and label count; user data is checked against it.
        build_model: returns a fresh model; called with a seeded global torch RNG so every party builds the same
            initial weights. Must be Opacus-compatible (no BatchNorm: use GroupNorm).
        load_bundled: returns the whole bundled data set (used by simulation and as the server's test set), or
            ``None`` if the task ships no data.
        preprocess: maps raw feature arrays to model inputs, record by record, with FIXED public constants
            (for example a mean and scale computed once from public data and written in the code); applied to data
            loaded from a user's files. It must not fit statistics on the private data (a mean, a vocabulary, a
            min/max): those depend on every record, travel into the model outside DP-SGD and void the epsilon.
            Fit them on public data, or estimate them with DP and charge that to the site's ledger yourself.
        loss_fn: training loss (per-batch mean).
        encode_texts: a text task's fixed encoder, ``texts -> model inputs`` (token ids), record by record: its
            files are tables with a text column (:mod:`fedshield.data.task_files`); ``None``: numeric tables or
            image folders.
        channels_last: run this model in channels-last memory format where only a forward pass or plain SGD
            touches it: the server's test (on a copy) and a site's rounds without DP-SGD and its evaluations (Opacus'
            per-sample gradients keep the default format). The weights on the wire are unchanged (contiguous) and
            results differ from the default format only by float rounding. Why: CPU convolutions and pooling run
            faster in it, twice as fast over the server's test set, ~10% for a simulated client's few steps (issue
            13). Only for a 2-D convolutional model (4-D weights: a ``Conv3d`` cannot take this format) whose
            ``forward`` never ``view``s a convolution's output (``flatten`` and ``reshape`` are fine).
    """

    spec: DataSpec
    build_model: Callable[[], nn.Module]
    load_bundled: Callable[[], Dataset] | None = None
    preprocess: Callable[[np.ndarray], np.ndarray] | None = None
    loss_fn: Callable[[], nn.Module] = nn.CrossEntropyLoss
    encode_texts: Callable[[list[str]], np.ndarray] | None = None
    channels_last: bool = False

    @property
    def name(self) -> str:
        return self.spec.name

    def in_channels_last(self, model: nn.Module) -> nn.Module:
        """``model`` in channels-last memory format (see ``channels_last``), or a one-line :class:`ConfigError`
        naming the fix when its weights cannot take that format (a ``Conv3d``'s 5-D weights, say)."""
        try:
            return model.to(memory_format=torch.channels_last)
        except RuntimeError as exc:
            raise ConfigError(f"task {self.name!r} sets channels_last=True but its model cannot run in channels-last "
                              f"memory format ({exc}): build the task with channels_last=False") from None

    def new_model(self, seed: int) -> nn.Module:
        """The initial global model: same seed, same weights on every machine.

        The CPU generator is seeded directly: ``torch.manual_seed`` also queues a seed for every accelerator backend
        torch knows (CUDA, XPU, MTIA, ...), recording a Python stack for each (measured 2-5 ms a call, and a
        simulated client builds its model every round). CUDA and MPS are still seeded where this machine has them.
        """
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            if torch.cuda.is_available():
                torch.cuda.manual_seed_all(seed)
            if torch.backends.mps.is_available():
                torch.mps.manual_seed(seed)
            return self.build_model()
