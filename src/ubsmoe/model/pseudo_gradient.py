"""The Universal Pseudo-Gradient: a learning signal for the experts a token did not activate.

For every LoRA-carrying matrix W of expert i, with G_j(x) the true gradient of W_j from token x, w_j(x)
the gate value expert j had in the forward and P(x) = sum_{k in A(x)} p_k(x),
    G_hat(x) = sum_{j in A(x)} (p_j(x) / P(x)) G_j(x) / w_j(x)     (probability-weighted gradient per unit of gate)
    G_tilde_i = rho * sum_{x : i not in A(x)} p_i(x) G_hat(x)
and the LoRA factors of W_i receive s G_tilde_i B_i^T and s A_i^T G_tilde_i (s = alpha / r) on top of
their true gradients. Per slot the weight of G_j is c_j = (p_j / P) / w_j: 1 / P for softmax gates
(w_j = p_j), p_j / P for the straight-through gate of upcycled models (w_j = 1), 1 for softmax gates
renormalised over the active experts (w_j = p_j / P). G_j(x) is an outer product in(x) delta_j(x)^T, so
every sum is taken through A_i or B_i first (the factor trick): no per-token (in x out) matrix is formed
and no inactive expert runs forward; the cost per expert is O(T r (d + h)), and the layer's own pass
already holds two of the products.

Up- and gate-projections share their input x across experts, so G_hat(x) = x delta_bar(x)^T with
delta_bar(x) = sum_j c_j delta_j(x). The down-projection shares its output gradient g(x) and reads
w_j a_j(x) (a_j the activation), so G_hat(x) = h_bar(x) g(x)^T with h_bar(x) = sum_j (p_j / P) a_j(x).

Of the four factor gradients per expert, two are products the layer's backward runs over all (token,
expert) pairs because this hook reads every expert (``reads_every_expert``; without it the layer takes
them over its slots alone, ``grouped_lora``): grad A_up = x^T rows and grad B_down = rows^T g. The
pseudo-gradient adds its rows to those (``extra_rows``), so what it costs there is the difference between
the dense products and the per-slot ones (2 (T E - S) d r multiply-adds per such factor, which the FLOP
counter books under the LoRA); the other two, for B_up and A_down, are computed after the backward by
``apply``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ubsmoe.model.expert_observation import ExpertComputation, ExtraRows
from ubsmoe.model.moe_layer import MoEHook, SlotLayout, SparseMoEFFN


@dataclass
class _Saved:
    """What a layer's forward leaves for its pseudo-gradient: the slots' layout, q (T, E, r), the active
    slots' weights c_j (S, 1), the rows shared with the backward, every token's x A_e (T, E, r) by
    projection, h_bar (T, h), and delta_bar (T, h) by projection once its gradient arrived."""

    layout: SlotLayout
    weight: torch.Tensor
    per_gate: torch.Tensor
    extra_rows: ExtraRows
    projected: dict[str, torch.Tensor]
    hidden_bar: torch.Tensor
    delta_bar: dict[str, torch.Tensor] = field(default_factory=dict)


class PseudoGradient(MoEHook):
    """Adds the pseudo-gradients to the LoRA factors' gradients of the layers it is attached to.

    During the forward it prepares the rows for B_down, in a gradient hook of the up (and gate)
    projection those for A_up (A_gate), both taken by the layer's backward; ``apply`` adds the rest
    after the backward. Two of the products it reads are formed by the layer for it (``reads_every_expert``):
    x A_i for every expert in the forward, and s g(x) B_i^T of the down-projection in its backward.
    """

    reads_every_expert = True  # x A_i for every expert, s g B_i^T for every expert, and its own rows

    def __init__(self, rho: float):
        self.rho = rho
        self.saved: dict[SparseMoEFFN, _Saved] = {}

    def observe_experts(self, layer: SparseMoEFFN, layout: SlotLayout, seen: ExpertComputation) -> None:
        self.saved.pop(layer, None)
        if not seen.hidden.requires_grad:
            return
        if layer.active_rank != layer.lora_rank:
            raise ValueError("pseudo-gradients assume every client trains the full LoRA rank")
        record = layer.last_routing
        probs = record.probs.detach()
        T, E = probs.shape
        active = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, record.experts, True)
        active_mass = (probs * active).sum(1)  # P(x): (T,)
        # q_i(x) = rho p_i(x) for inactive pairs (0 for active ones), repeated over the rank: (T, E, r).
        # Multiplying (T, E, r) tables by a (T, E, 1) broadcast runs an inner loop of r elements, ten times
        # slower than same-shape tensors.
        weight = (probs * ~active * self.rho).unsqueeze(2).expand(T, E, layer.lora_rank).contiguous()
        s = layer.lora_scale
        # p_j / P per slot, and c_j = (p_j / P) / w_j, the weight of an active expert's gradient in G_hat
        share = probs.reshape(-1).index_select(0, layout.pair).div_(active_mass.index_select(0, layout.token))
        per_gate = share / seen.gates.detach().clamp_min(torch.finfo(share.dtype).tiny)  # (S,)
        # B_down: s sum_x q_i(x) (h_bar(x) A_i)^T g(x), as rows s q_i(x) h_bar(x) A_i next to the layer's own
        hidden_bar = _per_token_sum(seen.activation.detach() * share.unsqueeze(1), layout, T)  # (T, h)
        a = layer.lora_down_a.detach()  # (E, h, r)
        through_a = (hidden_bar @ a.permute(1, 0, 2).reshape(a.shape[1], -1)).view(T, E, -1)
        seen.extra_rows.down = through_a.mul_(weight).mul_(s).view(T, -1)
        saved = _Saved(layout, weight, per_gate.unsqueeze(1), seen.extra_rows,
                       {n: p.detach() for n, p in seen.projected.items()}, hidden_bar)
        self.saved[layer] = saved
        for name, projection in (("up", seen.up), ("gate", seen.gate)):
            if projection is not None and projection.requires_grad:
                projection.register_hook(lambda grad, name=name: self._input_side_rows(layer, saved, name, grad))

    def _input_side_rows(self, layer: SparseMoEFFN, saved: _Saved, name: str, grad: torch.Tensor) -> None:
        """On the gradient (S, h) of the ``name`` projection: delta_bar, and the rows for A_name,
        s q_i(x) delta_bar(x) B_i^T (grad A_i = x^T rows)."""
        T, E = saved.weight.shape[:2]
        delta_bar = _per_token_sum(grad * saved.per_gate, saved.layout, T)  # (T, h)
        b = getattr(layer, f"lora_{name}_b").detach()  # (E, r, h)
        through_b = (delta_bar @ b.permute(2, 0, 1).reshape(-1, E * b.shape[1])).view(T, E, -1)
        setattr(saved.extra_rows, name, through_b.mul_(saved.weight).mul_(layer.lora_scale).view(T, -1))
        saved.delta_bar[name] = delta_bar

    def training_flops(self, layer: SparseMoEFFN, tokens: int) -> float:
        """Per adapted matrix, two (T x E r) products with the hidden width h: 4 T E r h."""
        if layer.top_k == layer.num_experts:
            return 0.0
        return 4.0 * tokens * layer.num_experts * layer.lora_rank * layer.d_hidden * len(layer.adapted)

    def compute(self, layer: SparseMoEFFN) -> dict[str, torch.Tensor]:
        """The pseudo-gradients of B_up (B_gate) and A_down by parameter name (``lora_up_b``, ...): the
        part the layer's backward did not add. Empty when the last forward activated every expert or no
        backward has run since."""
        saved = self.saved.pop(layer, None)
        if saved is None or saved.extra_rows.down_through_b is None:
            return {}
        weight, s = saved.weight, layer.lora_scale
        T, E, r = weight.shape
        grads = {}
        for name, delta_bar in saved.delta_bar.items():  # grad B_i = s sum_x q_i(x) (x A_i)^T delta_bar(x)
            rows = (saved.projected[name] * weight).mul_(s).view(T, E * r)
            grads[f"lora_{name}_b"] = (rows.T @ delta_bar).view(E, r, -1)
        # grad A_i of the down-projection = sum_x q_i(x) h_bar(x) (s g(x) B_i^T)
        through_b = saved.extra_rows.down_through_b.view(T, E, r)
        grads["lora_down_a"] = (saved.hidden_bar.T @ (through_b * weight).view(T, E * r)).view(-1, E, r).permute(1, 0, 2)
        return grads

    def apply(self, layer: SparseMoEFFN) -> None:
        """Add the pseudo-gradients that the layer's backward did not to the LoRA factors' gradients."""
        for name, grad in self.compute(layer).items():
            param = getattr(layer, name)
            param.grad = grad.clone() if param.grad is None else param.grad.add_(grad)


def _per_token_sum(values: torch.Tensor, layout: SlotLayout, num_tokens: int) -> torch.Tensor:
    """Sum the slot rows (S, n) of each token -> (T, n)."""
    return values.new_zeros(num_tokens, values.shape[1]).index_add_(0, layout.token, values)


RHO_RULES = ("1-k/m", "m/k", "kmax/k")


def sparsity_factor(rule: str, k: int, k_max: int, num_experts: int) -> float:
    """rho_c: ``1-k/m`` (default), ``m/k`` or ``kmax/k``."""
    rules = dict(zip(RHO_RULES, (1 - k / num_experts, num_experts / k, k_max / k)))
    if rule not in rules:
        raise ValueError(f"unknown rho rule {rule!r}; choose one of {', '.join(RHO_RULES)}")
    return rules[rule]
