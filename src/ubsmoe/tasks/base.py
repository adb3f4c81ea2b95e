"""The task protocol: what a federated fine-tuning task owns, so that the engine and the methods need not know it.

A task turns its data into token batches, builds the head the model carries, computes the training
loss, scores a configured model on held-out data, and says what clients are partitioned by. The
engine drives rounds and keeps the accounting (FLOPs, expert load); methods see only the model's MoE
layers and trainable state. A new task is one file that subclasses ``Task`` and registers itself.
"""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from ubsmoe.config import ConfigError, ExperimentConfig
from ubsmoe.data.dataset import Batch, TokenizedDataset
from ubsmoe.model import HeadFactory, MoEModel


@dataclass
class TaskData:
    """A task's data, tokenised: what clients train on and what tiers are scored on.

    test: what ``Task.evaluate`` scores, in the task's own form (its length is the number of test examples);
    partition_keys: one integer per training example, what ``federation.partition`` splits clients by
    (a class label, a source task), named by ``key_names``; duplicates_removed: examples left out
    because they repeated another (or a test example).
    """

    train: TokenizedDataset
    test: Sized
    partition_keys: list[int]
    key_names: list[str]
    duplicates_removed: int = 0


@dataclass
class Evaluation:
    """A configured model's scores on held-out data: ``accuracy`` and mean ``loss`` (every task reports
    them; the report reads them per tier) and any further task-specific figures by name."""

    accuracy: float
    loss: float
    details: dict[str, float] = field(default_factory=dict)


ForwardObserver = Callable[[torch.Tensor], None]
"""Called with the attention mask (B, S) after every forward pass an evaluation runs (FLOP counting)."""


class Task:
    """Base class of tasks; subclasses override every method."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    # How PEFT loads an exported dense tier: its task type, and where the backbone's modules sit under the
    # model class that type loads (AutoModel: at the top; AutoModelForCausalLM: under ``model.``)
    peft_task_type: ClassVar[str] = "FEATURE_EXTRACTION"
    peft_module_prefix: ClassVar[str] = ""

    def __init__(self, config: ExperimentConfig):
        self.config = config

    @classmethod
    def check(cls, config: ExperimentConfig) -> None:
        """Refuse (``ConfigError``) settings this task cannot run, before anything is loaded."""

    def load(self, tokenizer) -> TaskData:
        """Read, deduplicate, split and tokenise the data the config names."""
        raise NotImplementedError

    def head(self, data: TaskData) -> HeadFactory:
        """The head the model carries for this task, given its data (e.g. the number of classes)."""
        raise NotImplementedError

    def loss(self, model: MoEModel, batch: Batch) -> torch.Tensor:
        """The mean training loss of ``model`` on ``batch`` (differentiable)."""
        raise NotImplementedError

    def evaluate(self, model: MoEModel, data: Sized, batch_size: int,
                 observe: ForwardObserver | None = None) -> Evaluation:
        """Scores of ``model`` as it is configured now (eval mode, no gradients) on ``data`` (``TaskData.test``)."""
        raise NotImplementedError

    def check_records(self, records: list[dict], source: Path, key_names: list[str]) -> None:
        """Refuse (``ConfigError``, records counted from 1) input records ``predict`` could not read; runs
        before the model is loaded."""
        raise ConfigError(f"ubsmoe predict does not support the {self.name} task yet")

    def predict(self, model: MoEModel, records: list[dict], key_names: list[str], batch_size: int) -> list[dict]:
        """One JSON-ready prediction per input record (checked by ``check_records``), with the model as
        configured now."""
        raise ConfigError(f"ubsmoe predict does not support the {self.name} task yet")

    def labelled(self, path: Path, key_names: list[str]) -> Sized:
        """A labelled file as ``evaluate`` reads it, labels numbered as in training (``key_names``); needs
        the tokenizer, not the model, so that bad data is refused before the model loads."""
        raise ConfigError(f"ubsmoe evaluate does not support the {self.name} task yet")


REGISTRY: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its ``name`` to the config and the CLI."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"task name {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls

