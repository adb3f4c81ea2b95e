"""Low-rank adapters: a LoRA wrapper for one frozen linear layer, used on attention projections."""

from __future__ import annotations

import math

import torch
from torch import nn


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
        flat = x.reshape(-1, x.shape[-1])  # (N, in)
        out = self.base(flat)  # (N, out), a fresh tensor
        # The update is accumulated into the frozen product in place (its backward does not read it):
        # no second (N, out) tensor and no separate addition. The small factor carries the scale.
        out.addmm_(flat @ self.lora_a[:, :r], self.lora_b[:r] * self.scale)
        return out.view(*x.shape[:-1], out.shape[-1])


def kaiming_uniform(shape: tuple[int, ...], fan_in: int, generator: torch.Generator | None) -> torch.Tensor:
    """The default LoRA-A initialisation (Kaiming-uniform with a = sqrt(5), as ``nn.Linear`` uses)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound
