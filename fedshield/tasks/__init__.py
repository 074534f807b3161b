"""Tasks: a model, its loss and the data contract, behind one protocol."""

from .base import Dataset as Dataset
from .base import Task as Task
from .registry import TASKS as TASKS
from .registry import get_task as get_task

__all__ = ["Dataset", "Task", "TASKS", "get_task"]
