"""Activation checkpointing of the attention blocks: in training, each block keeps only its inputs and runs
its forward again in the backward, instead of keeping its queries, keys, values and attention weights.

Attention's activations do not depend on K, so they are what a low-budget client cannot shrink by
activating fewer experts. Recomputation gives exactly the same numbers (dropout replays its random state).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ubsmoe.model.moe_model import MoEModel


def attention_blocks(model: MoEModel) -> list[nn.Module]:
    """Each layer's attention block: the module that holds its query and value projections."""
    blocks = []
    for layer in model.family.layers(model.backbone):
        for parent, _ in model.family.attention(layer).values():
            if all(parent is not b for b in blocks):
                blocks.append(parent)
    return blocks


def set_attention_checkpointing(model: MoEModel, on: bool) -> None:
    """Recompute every attention block in the backward (``on``), or keep its activations (the default)."""
    for block in attention_blocks(model):
        if on and "forward" not in vars(block):
            block.forward = _recomputed(block.forward)
        elif not on:
            vars(block).pop("forward", None)


def _recomputed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run
