"""Dynamic Modulated Routing's forward part: modulate routing logits inside the candidate set.

For each token, the candidate set T holds the top-N_p experts by raw score s; the modulated logits are
m_i = s_i + phi_i for i in T and m_i = s_i otherwise, and both the top-K selection and the softmax
use m. phi is the layer's ``modulation`` parameter, which ``attach_phi`` gives it (UB-SMoE's
``prepare_model``, as every method attaches its per-layer state); the server side of DMR (utilisation
targets and the blend) lives in the ``ubsmoe`` method.
"""

from __future__ import annotations

import torch
from torch import nn

from ubsmoe.model.moe_layer import MoEHook, SparseMoEFFN


def attach_phi(layer: SparseMoEFFN) -> nn.Parameter:
    """Give ``layer`` DMR's per-expert logit modulation φ (E,) as its trainable parameter ``modulation``,
    zero (no modulation) until trained, so that it trains and travels with the other trainable tensors."""
    weight = layer.router.weight
    phi = nn.Parameter(torch.zeros(layer.num_experts, dtype=weight.dtype, device=weight.device))
    layer.register_parameter("modulation", phi)
    return phi


class ModulatedRouting(MoEHook):
    """Add the layer's ``modulation`` (E,) to the logits of each token's top-``candidates`` experts."""

    def __init__(self, candidates: int):
        if candidates < 1:
            raise ValueError(f"the candidate set needs at least one expert, got {candidates}")
        self.candidates = candidates

    def modulate(self, layer, select: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """select, logits: (T, E) raw scores -> (m, m)."""
        n = min(self.candidates, layer.num_experts)
        candidates = select.detach().topk(n, dim=-1).indices
        inside = torch.zeros_like(select, dtype=torch.bool).scatter_(1, candidates, True)
        shift = torch.where(inside, layer.modulation, torch.zeros((), dtype=select.dtype))
        return select + shift, logits + shift


def range_penalty(phi: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """||ReLU(low - phi)||^2 + ||ReLU(phi - high)||^2."""
    return torch.relu(low - phi).square().sum() + torch.relu(phi - high).square().sum()
