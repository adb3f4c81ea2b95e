"""Tasks: what is fine-tuned and how it is scored (one file per task, registered by name)."""

from ubsmoe.tasks import causal_lm, classification  # noqa: F401  (registers the tasks)
from ubsmoe.tasks.base import REGISTRY, Evaluation, Task, TaskData, get_task, register

__all__ = ["REGISTRY", "Evaluation", "Task", "TaskData", "get_task", "register"]
