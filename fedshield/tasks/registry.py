"""Task names a user can type, and ``module:function`` paths to their own tasks."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import lru_cache

from ..errors import ConfigError
from .base import Task
from .builtin import breast_cancer_task, digits_task
from .dp_compatible import make_dp_compatible
from .text import is_text_task, text_task_from_name

__all__ = ["TASKS", "get_task"]

TASKS: dict[str, Callable[[], Task]] = {
    "digits": digits_task,
    "breast-cancer": breast_cancer_task,
}


@lru_cache(maxsize=16)  # resolved every round by every client: import and validate once per process
def get_task(name: str) -> Task:
    """Resolve a built-in task name, or ``package.module:factory`` returning a :class:`Task`.

    A user's model is checked with Opacus' validator on load; a BatchNorm is replaced by GroupNorm (warning),
    any other unsupported layer is a :class:`ConfigError` that names it.
    """
    if name in TASKS:
        return TASKS[name]()
    if is_text_task(name):  # text, text-CLASSES, text-CLASSES-TOKENS (fedshield.tasks.text)
        return text_task_from_name(name)
    return make_dp_compatible(_load_user_task(name))


def _load_user_task(name: str) -> Task:
    if ":" not in name:
        raise ConfigError(
            f"unknown task {name!r}: choose one of {', '.join(TASKS)}, text, or give your own as package.module:factory"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"task {name!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"task {name!r}: {module_name} has no callable {attr!r}")
    task = factory()
    if not isinstance(task, Task):
        raise ConfigError(f"task {name!r}: {attr}() returned {type(task).__name__}, expected fedshield Task")
    return task
