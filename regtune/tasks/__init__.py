"""Tasks: data + model + loss + evaluation. Importing this package registers them."""

from regtune.tasks import grokking  # noqa: F401
from regtune.tasks.base import Task, get_task, register_task, task_names

__all__ = ["Task", "get_task", "register_task", "task_names"]
