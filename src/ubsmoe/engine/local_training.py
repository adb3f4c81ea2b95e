"""One client's local training on the shared model: AdamW on the trainable tensors, the task's loss, the
method's hooks applied."""

from __future__ import annotations

import math
import time

import torch

from ubsmoe.config import TrainConfig
from ubsmoe.data.dataset import Batch, TokenizedDataset
from ubsmoe.methods.base import FederatedMethod
from ubsmoe.methods.records import TrainMetrics
from ubsmoe.metrics.flops import FlopCounter, PassFlops
from ubsmoe.model import MoEModel
from ubsmoe.model.activation_checkpointing import set_attention_checkpointing
from ubsmoe.tasks import Task


def local_steps(config: TrainConfig, num_examples: int) -> int:
    if config.local_epochs > 0:
        return max(1, math.ceil(config.local_epochs * num_examples / config.batch_size))
    return config.local_steps


def shuffled_batches(indices: torch.Tensor, batch_size: int, generator: torch.Generator):
    """Endless batches of ``indices``: a fresh permutation per pass, the last short batch of a pass kept."""
    while True:
        order = indices[torch.randperm(len(indices), generator=generator)]
        yield from order.split(batch_size)


def local_step(model: MoEModel, task: Task, method: FederatedMethod, batch: Batch, optimizer) -> torch.Tensor:
    """One optimiser step on ``batch`` with the task's loss and the method's extra loss and gradient
    adjustments; returns the task loss (detached)."""
    loss = task.loss(model, batch)
    extra = method.local_loss(model)
    optimizer.zero_grad(set_to_none=True)
    (loss if extra is None else loss + extra).backward()
    method.after_backward(model)
    optimizer.step()
    return loss.detach()


def train_local(model: MoEModel, task: Task, method: FederatedMethod, data: TokenizedDataset,
                indices: torch.Tensor, config: TrainConfig, generator: torch.Generator, progress=None,
                flop_counter: FlopCounter | None = None) -> TrainMetrics:
    """Run a client's local steps on its examples ``indices``; returns what it measured (the FLOPs by
    part only with a counter; no bytes: the engine counts its records)."""
    model.train()
    model.reset_routing_counters()
    set_attention_checkpointing(model, config.activation_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps = local_steps(config, len(indices))
    batches = shuffled_batches(indices, config.batch_size, generator)
    losses, seconds = [], []
    flops, tokens = PassFlops(), 0
    started = time.perf_counter()
    for _ in range(steps):
        start = time.perf_counter()
        batch = data.batch(next(batches))
        attention_mask = batch[1]
        loss = local_step(model, task, method, batch, optimizer)
        seconds.append(time.perf_counter() - start)
        tokens += int(attention_mask.sum())
        if flop_counter is not None:
            flops = flops + flop_counter.count(attention_mask, training=True)
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    if not math.isfinite(sum(losses)):
        raise FloatingPointError(f"training loss became {sum(losses)}; lower train.lr")
    return TrainMetrics(train_loss=sum(losses) / len(losses), steps=steps, train_tokens=tokens,
                        train_seconds=time.perf_counter() - started, step_seconds=seconds,
                        train_flops=flops.as_dict() if flop_counter is not None else {})
