"""Which torch device a client trains on: ``auto`` (a CUDA GPU when torch sees one, else the CPU), ``cpu``,
``cuda`` or ``cuda:N``.

The spelling is checked by :mod:`fedshield.config` (no torch needed, so a server without a GPU can validate a run
whose clients have one); whether the device exists is checked here, on the machine that trains.
"""

from __future__ import annotations

import torch

from .config import normalise_device_spec
from .errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names on this machine; ``auto`` and ``cuda`` resolve to a numbered GPU.

    Raises:
        ConfigError: ``spec`` is malformed, or names a CUDA device this machine (or this torch build) lacks.
    """
    spec = normalise_device_spec(spec)
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {spec!r} was asked for, but torch sees no CUDA GPU here ({_cuda_diagnosis()}): train on the "
            "CPU with device cpu (or auto, which falls back to the CPU) - on a deployed site the node config "
            "key device=cpu overrides the run's setting - or install a CUDA build of torch on a machine with an "
            "NVIDIA GPU and driver"
        )
    if spec in ("auto", "cuda"):
        return torch.device("cuda", torch.cuda.current_device())
    index, count = int(spec.partition(":")[2]), torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"device {spec!r} was asked for, but this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1}; "
            "CUDA_VISIBLE_DEVICES may hide others): choose one of those, or cuda / auto for the current one"
        )
    return torch.device("cuda", index)


def _cuda_diagnosis() -> str:
    if torch.version.cuda is None:
        return f"this torch {torch.__version__} is a CPU-only build"
    return f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, but no GPU or driver is visible"
