"""Low-rank adapters: a LoRA wrapper for one frozen linear layer, used on attention projections."""

from __future__ import annotations

import math

import torch
from torch import nn

from ubsmoe.model.matmul import narrow_product


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / r) * x A B``.

    ``lora_a: (in, r)`` starts Kaiming-uniform and ``lora_b: (r, out)`` starts at zero, so the wrapped
    layer equals the base layer before training. ``active_rank`` lets a client train only the first
    ranks (heterogeneous-rank methods); the scale stays ``alpha / rank`` of the allocated rank so that
    a truncated adapter is a prefix of the full one.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        self.active_rank = rank
        self.lora_a = nn.Parameter(kaiming_uniform((base.in_features, rank), base.in_features, generator))
        self.lora_b = nn.Parameter(torch.zeros(rank, base.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        r = self.active_rank
        a, b = self.lora_a[:, :r], self.lora_b[:r]
        weight = self.base.weight
        if not x.dtype == weight.dtype == a.dtype:
            return self._mixed(x, a, b)
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        out = _LoRAProduct.apply(flat, weight, self.base.bias, a, b, self.scale)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _mixed(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Lower-precision frozen weights (bf16) or inputs: the frozen product in the weight's dtype, the
        low-rank one s (x A) B in the factors' (float32), summed in float32 and returned in x's dtype. The
        update is never folded into the frozen weight, where an update far below its rounding step would vanish."""
        weight, bias = self.base.weight, self.base.bias
        frozen = torch.nn.functional.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
        low_rank = (x.to(a.dtype) @ a) @ b
        return (frozen.to(a.dtype) + self.scale * low_rank).to(x.dtype)


class _LoRAProduct(torch.autograd.Function):
    """x Wᵀ + bias + s (x A) B with hand-picked products: the rank-r ones run in MKL's fast orientation
    (``narrow_product``), and the input gradient goes through the merged weight W + s (A B)ᵀ in one matmul.

    forward(x (N, in), weight (out, in) frozen, bias (out,) or None, a (in, r), b (r, out), scale) -> (N, out).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale):
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            raise ValueError("LoRALinear computes no gradient for its base layer: "
                             "keep base.weight and base.bias frozen")
        out = torch.nn.functional.linear(x, weight, bias)  # (N, out), a fresh tensor
        projected = narrow_product(x, a)  # x A: (N, r)
        out.addmm_(projected, b, alpha=scale)  # in place: no second (N, out) tensor
        ctx.save_for_backward(x, weight, a, b, projected)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, a, b, projected = ctx.saved_tensors
        s = ctx.scale
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ torch.addmm(weight, b.T, a.T, alpha=s)  # through W + s (A B)ᵀ
        if ctx.needs_input_grad[3]:
            through_b = narrow_product(grad, b.T)  # g Bᵀ: (N, r)
            grad_a = narrow_product(x.T, through_b).mul_(s)  # s xᵀ g Bᵀ: (in, r)
        if ctx.needs_input_grad[4]:
            grad_b = (projected.T @ grad).mul_(s)  # s (x A)ᵀ g: (r, out)
        return grad_x, None, None, grad_a, grad_b, None


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    """The default LoRA-A initialisation (Kaiming-uniform with a = sqrt(5), as ``nn.Linear`` uses)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound
