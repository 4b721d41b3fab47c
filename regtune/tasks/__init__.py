"""Tasks: data + model + loss + evaluation. Importing this package registers them."""

from regtune.tasks import grokking  # noqa: F401
from regtune.tasks import cifar  # noqa: F401
from regtune.tasks import cifar_ire  # noqa: F401
from regtune.tasks import imagenet  # noqa: F401
from regtune.tasks import text  # noqa: F401
from regtune.tasks.base import Task, get_task, register_task, task_names

__all__ = ["Task", "get_task", "register_task", "task_names"]
