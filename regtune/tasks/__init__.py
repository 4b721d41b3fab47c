"""Tasks: data + model + loss + evaluation. Importing this package registers them."""

from regtune.tasks import (
    cifar,  # noqa: F401
    cifar_ire,  # noqa: F401
    grokking,  # noqa: F401
    imagenet,  # noqa: F401
    text,  # noqa: F401
)
from regtune.tasks.base import Task, get_task, register_task, task_names

__all__ = ["Task", "get_task", "register_task", "task_names"]
