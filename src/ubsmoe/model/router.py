"""The top-K router of a sparse-MoE layer: scores, their modulation, the selection, the gates, their counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ubsmoe.model.matmul import NarrowLinear

GATE_MODES = ("straight_through", "softmax", "softmax_renorm")
"""How the chosen experts' router probabilities become gates: exactly 1 with the probability's gradient
(straight-through), the probabilities themselves, or the probabilities renormalised over the K chosen."""

Modulation = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Maps (selection scores, probability logits), both (T, E), to new ones (``MoEHook.modulate``)."""


@dataclass
class RoutingRecord:
    """What one forward pass of one layer routed; kept until the next forward for losses and hooks.

    All tensors cover the T non-padding tokens of the batch, in row-major (batch, seq) order.
    scores: (T, E) raw router scores s; logits: (T, E) the logits the probabilities come from (s, or
    s + modulation); probs: (T, E) softmax(logits), differentiable; experts: (T, K) selected experts;
    gates: (T, K) the gate values the expert outputs were multiplied by.
    """

    scores: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor


class TopKRouter(nn.Linear):
    """A linear router over E experts, without bias: ``weight`` (E, d).

    ``forward`` is ``nn.Linear``'s: x (..., d) -> raw scores (..., E). ``route`` routes T tokens: scores
    s = x Wᵀ (T, E); ``modulate`` maps (s, s) to (selection scores, probability logits) (T, E), a method's
    candidate set and modulation φ (DMR); probs = softmax(logits) (T, E); experts (T, K) the top-K of the
    selection scores; gates (T, K) the chosen experts' probabilities, turned into gates by the gate mode.
    """

    def __init__(self, d_model: int, num_experts: int, weight: torch.Tensor):
        super().__init__(d_model, num_experts, bias=False)
        with torch.no_grad():
            self.weight.copy_(weight)

    def route(self, x: torch.Tensor, top_k: int, gate_mode: str, modulate: Modulation | None = None) -> RoutingRecord:
        """x: (T, d) real tokens -> the record of their routing to ``top_k`` experts each (``RoutingRecord``)."""
        scores = NarrowLinear.apply(x, self.weight)  # (T, E): x W_rᵀ in MKL's fast orientation
        select, logits = (scores, scores) if modulate is None else modulate(scores, scores)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(x.dtype)
        experts = select.topk(top_k, dim=-1).indices  # (T, K)
        gates = probs.gather(1, experts)
        if gate_mode == "straight_through":
            gates = gates - gates.detach() + 1.0  # value exactly 1, gradient d/dp to the router
        elif gate_mode == "softmax_renorm":
            gates = gates / gates.sum(-1, keepdim=True)
        return RoutingRecord(scores, logits, probs, experts, gates)


class RoutingCounter:
    """Running routing statistics of one layer: what DMR uploads and what balance metrics read.

    routed: (E,) tokens routed to each expert; tokens: non-padding tokens seen; prob_sum: (E,) sum over
    tokens of the router probability of each expert. The sums stay where the routing runs (no copy to the
    CPU, and so no GPU synchronisation, per forward); ``routed`` and ``prob_sum`` read them as CPU float64.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self._routed: torch.Tensor | None = None
        self._prob_sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, experts: torch.Tensor, probs: torch.Tensor) -> None:
        """experts: (T, K) selected experts; probs: (T, E) router probabilities."""
        routed = torch.bincount(experts.reshape(-1), minlength=self.num_experts).to(torch.float64)
        prob_sum = probs.detach().sum(0).to(torch.float64)
        self._routed = routed if self._routed is None else self._routed + routed
        self._prob_sum = prob_sum if self._prob_sum is None else self._prob_sum + prob_sum
        self.tokens += experts.shape[0]

    @property
    def routed(self) -> torch.Tensor:
        return torch.zeros(self.num_experts, dtype=torch.float64) if self._routed is None else self._routed.cpu()

    @property
    def prob_sum(self) -> torch.Tensor:
        return torch.zeros(self.num_experts, dtype=torch.float64) if self._prob_sum is None else self._prob_sum.cpu()
