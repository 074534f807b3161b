"""Make sure a task's model can be trained with DP-SGD before any round starts, on every party the same way.

Opacus' ``ModuleValidator`` lists what it cannot train privately. What it can fix is fixed (BatchNorm -> GroupNorm,
LSTM -> DPLSTM, MultiheadAttention -> DPMultiheadAttention), with a warning: the architecture changes, and server and clients must build the same one, which is why the fix is applied
inside the task's model factory rather than to one model object). Anything else it rejects is named in the error.
"""

from __future__ import annotations

import dataclasses
import logging

from torch import nn

from ..errors import ConfigError
from .base import Task

__all__ = ["make_dp_compatible"]

log = logging.getLogger(__name__)


def _problems(model: nn.Module) -> list[Exception]:
    from opacus.validators import ModuleValidator

    return list(ModuleValidator.validate(model, strict=False))


def make_dp_compatible(task: Task) -> Task:
    """Return ``task`` unchanged if Opacus accepts its model, a task whose factory applies Opacus' fix if that
    is enough (BatchNorm -> GroupNorm), or raise :class:`ConfigError` naming the layers Opacus cannot train."""
    problems = _problems(task.new_model(0))
    if not problems:
        return task
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(task.new_model(0))
    remaining = _problems(fixed)
    if remaining:
        names = "; ".join(_short(p) for p in remaining)
        raise ConfigError(
            f"task {task.name!r}: its model cannot be trained with DP-SGD: {names}. "
            "Replace those layers (see opacus.validators), or run with --no-dp"
        )
    log.warning(
        "task %r: %s; replaced by Opacus' fix (BatchNorm -> GroupNorm, LSTM -> DPLSTM, ...). Server and clients "
        "build the fixed model. "
        "Check its accuracy: a BatchNorm1d after a Linear layer becomes a GroupNorm with one channel per group, "
        "which outputs zeros; use LayerNorm there instead.",
        task.name, "; ".join(_short(p) for p in problems),
    )
    original = task.build_model

    def build_fixed() -> nn.Module:
        return ModuleValidator.fix(original())

    return dataclasses.replace(task, build_model=build_fixed)


def _short(problem: Exception) -> str:
    text = str(problem)
    first = text.split(". ")[0]
    return f"{type(problem).__name__}: {first}"
