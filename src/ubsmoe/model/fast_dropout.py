"""Dropout that costs little on a CPU, for the backbone's hidden states and attention probabilities.

PyTorch's CPU dropout draws one Bernoulli sample per element (about 7 ns each on this project's
machines), and attention dropout pushes ``scaled_dot_product_attention`` off its fused kernel onto
the unfused one. Together that is a quarter of a low-tier training step of the default model, a cost
that does not shrink with K. Here a keep-mask is read from 16 random bits per element, drawn 64 at a
time from torch's default generator (seeded like every other draw), and attention with dropout runs
as plain matmuls around a softmax. Without dropout (evaluation, or p = 0) attention stays on
Hugging Face's own SDPA path.

The drop probability is ``round(p * 65536) / 65536`` (p = 0.1 drops with probability 0.100006). Kept
values are scaled by 1 / (1 - p) as in ``torch.nn.Dropout``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

ATTENTION_IMPLEMENTATION = "ubsmoe_sdpa"
_RESOLUTION = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool tensor of ``shape``, each element False with probability round(p * 2^16) / 2^16."""
    n = math.prod(shape)
    words = torch.empty(-(-n // 4), dtype=torch.int64).random_(-(1 << 63), None, generator=generator)
    bits = words.view(torch.int16)[:n].view(shape)  # uniform on [-2^15, 2^15)
    return bits >= round(p * _RESOLUTION) - (_RESOLUTION >> 1)


class _Dropout(torch.autograd.Function):
    """x * keep / (1 - p); the backward applies the same mask (saved as 1 byte per element)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep = keep_mask(x.shape, p)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return torch.where(keep, x, 0.0).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Drop each element of ``x`` with probability p (training only) and scale the rest by 1 / (1 - p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    if x.device.type != "cpu":  # the fused GPU kernels are fast already
        return nn.functional.dropout(x, p, training=True)
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the cheap keep-mask; a drop-in replacement (same ``p``, same scaling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """A Hugging Face attention function: query (B, H, Lq, dh), key and value (B, H_kv, Lk, dh) ->
    ((B, Lq, H, dh), None). Without dropout it is Hugging Face's SDPA; with dropout the probabilities
    are computed explicitly and dropped with ``keep_mask``."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if dropout == 0.0 or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scaling, key.transpose(2, 3))  # (B, H, Lq, Lk)
    q_len, k_len = scores.shape[-2:]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    if attention_mask is None and is_causal and q_len > 1:
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = _Dropout.apply(torch.softmax(scores, dim=-1), dropout)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), None


def install(model: nn.Module) -> None:
    """Swap every ``nn.Dropout`` of a Hugging Face model for ``FastDropout`` and route its attention
    through ``attention_forward`` (masks built as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace))
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
