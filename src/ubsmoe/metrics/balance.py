"""Expert balance: how evenly tokens spread over experts, and which experts got no update in a round."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class LoadBalance:
    """How evenly tokens spread over the experts of each layer: per-layer coefficient of variation and
    normalised entropy (1 = perfectly even), and their means over layers."""

    cv: list[float]
    entropy: list[float]
    mean_cv: float
    mean_entropy: float

    @classmethod
    def from_json(cls, data: dict) -> LoadBalance:
        return cls(list(data["cv"]), list(data["entropy"]), float(data["mean_cv"]), float(data["mean_entropy"]))


def load_balance(load: torch.Tensor) -> LoadBalance:
    """load: (L, E) tokens (or shares) per expert -> per-layer coefficient of variation and normalised
    entropy (1 = perfectly even), with their means over layers."""
    load = load.double()
    share = load / load.sum(1, keepdim=True).clamp_min(1e-12)
    mean = share.mean(1)
    cv = share.std(1, unbiased=False) / mean.clamp_min(1e-12)
    entropy = -(share * share.clamp_min(1e-12).log()).sum(1) / math.log(load.shape[1])
    return LoadBalance(cv.tolist(), entropy.tolist(), cv.mean().item(), entropy.mean().item())


def experts_without_update(deltas: list[dict[str, torch.Tensor]], expert_tensors: dict[str, int],
                           num_layers: int, num_experts: int) -> float:
    """Share of (layer, expert) pairs whose stacked tensors no client changed this round.

    expert_tensors: name -> layer index of every tensor stacked by expert (leading dim E).
    """
    touched = torch.zeros(num_layers, num_experts, dtype=torch.bool)
    for delta in deltas:
        for name, layer in expert_tensors.items():
            if name in delta:
                touched[layer] |= delta[name].reshape(num_experts, -1).ne(0).any(1)
    return 1.0 - touched.float().mean().item()
