"""Tasks: what is fine-tuned and how it is scored (one file per task, registered by name)."""

from ubsmoe.tasks import causal_lm, classification  # noqa: F401  (registers the tasks)
from ubsmoe.config import UnknownNameError
from ubsmoe.tasks.base import REGISTRY, Evaluation, Task, TaskData, register

__all__ = ["REGISTRY", "Evaluation", "Task", "TaskData", "get_task", "register"]


def get_task(name: str) -> type[Task]:
    """The registered task of this name (the built-in ones are registered by importing this package)."""
    if name not in REGISTRY:
        raise UnknownNameError(f"unknown task {name!r}; registered tasks: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
