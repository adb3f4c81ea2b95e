"""Activation checkpointing for a low-memory client: what does not shrink with K is formed again in the
backward instead of kept.

- Attention blocks: in training, each block keeps only its inputs and runs its forward again in the
  backward, instead of keeping its queries, keys, values and attention weights. In a pre-norm layer (Llama,
  OLMoE, Mixtral, Qwen-MoE: ``input_layernorm`` feeds ``self_attn`` and nothing else) the norm is recomputed
  with its block: the block keeps the residual stream it reads, which the norm would keep anyway, rather
  than the norm's output as well.
- Experts' merged weights W + s A B (``GroupedExperts.keep_merged``): formed again from the parameters in
  the backward, so that no (E, d, h) tensor per matrix and layer is kept.

Recomputation gives exactly the same numbers (dropout replays its random state).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ubsmoe.model.grouped_experts import GroupedExperts
from ubsmoe.model.moe_model import MoEModel


def attention_blocks(model: MoEModel) -> list[nn.Module]:
    """Each layer's attention block: the module that holds its query and value projections."""
    return [block for _, block in _layer_blocks(model)]


def _layer_blocks(model: MoEModel) -> list[tuple[nn.Module, nn.Module]]:
    """(layer, attention block) pairs, each block once."""
    pairs = []
    for layer in model.family.layers(model.backbone):
        for parent, _ in model.family.attention(layer).values():
            if all(parent is not b for _, b in pairs):
                pairs.append((layer, parent))
    return pairs


def pre_attention_norm(layer: nn.Module, block: nn.Module) -> nn.Module | None:
    """The norm whose output only ``block`` reads: a pre-norm decoder layer's ``input_layernorm`` in front of
    its ``self_attn``; None for other layouts (BERT's norms follow the residual addition)."""
    norm = getattr(layer, "input_layernorm", None)
    return norm if isinstance(norm, nn.Module) and block is getattr(layer, "self_attn", None) else None


def set_attention_checkpointing(model: MoEModel, on: bool) -> None:
    """Recompute every attention block (and the norm in front of it) and the experts' merged weights in the
    backward (``on``), or keep them (the default)."""
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            module.keep_merged = not on
    for layer, block in _layer_blocks(model):
        norm = pre_attention_norm(layer, block)
        if on and "forward" not in vars(block):
            block.forward = _recomputed(block.forward, None if norm is None else norm.forward)
            if norm is not None:
                norm.forward = _unchanged  # the block applies it, inside the recomputed region
        elif not on:
            vars(block).pop("forward", None)
            if norm is not None:
                vars(norm).pop("forward", None)


def _unchanged(hidden: torch.Tensor) -> torch.Tensor:
    return hidden


def _recomputed(forward: Callable, norm: Callable | None) -> Callable:
    """``forward`` (and ``norm`` first, on the block's hidden states) recomputed in the backward."""

    def normed(hidden_states, *args, **kwargs):
        return forward(norm(hidden_states), *args, **kwargs)

    inner = forward if norm is None else normed

    def run(*args, **kwargs):
        if not args and "hidden_states" in kwargs:  # Hugging Face decoder layers pass it by name
            args = (kwargs.pop("hidden_states"),)
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    return run
