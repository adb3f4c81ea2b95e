"""The Universal Pseudo-Gradient: a learning signal for the experts a token did not activate.

For every LoRA-carrying matrix W of expert i, with G_j(x) the true gradient of W_j from token x,
    G_hat(x) = sum_{j in A(x)} G_j(x) / sum_{j in A(x)} p_j(x)       (gradient per unit of gate)
    G_tilde_i = rho * sum_{x : i not in A(x)} p_i(x) G_hat(x)
and the LoRA factors of W_i receive s G_tilde_i B_i^T and s A_i^T G_tilde_i (s = alpha / r) on top of
their true gradients. G_j(x) is an outer product in(x) delta_j(x)^T, so every sum is taken through
A_i or B_i first (the factor trick): no per-token (in x out) matrix is formed and no inactive expert
runs forward; the cost per expert is O(T r (d + h)), and the layer's own pass already holds two of the
products.

Up- and gate-projections share their input x across experts, so G_hat(x) = x delta_bar(x)^T with
delta_bar(x) = sum_j delta_j(x) / P(x). The down-projection shares its output gradient g(x), so
G_hat(x) = h_bar(x) g(x)^T with h_bar(x) = sum_j gate_j hidden_j(x) / P(x).
"""

from __future__ import annotations

import torch

from ubsmoe.model.moe_layer import MoEHook, SlotLayout, SparseMoEFFN


class PseudoGradient(MoEHook):
    """Captures what one forward/backward of a layer needs, then adds the pseudo-gradients (``apply``).

    Two of the products come free from the layer's own pass: x A_i for every expert is the forward's
    LoRA input projection, and s g(x) B_i^T of the down-projection is the gradient of its low-rank table.
    """

    def __init__(self, rho: float):
        self.rho = rho
        self.saved: dict[SparseMoEFFN, dict] = {}

    def observe_experts(self, layer: SparseMoEFFN, layout: SlotLayout, tensors: dict) -> None:
        saved = {"layout": layout, "tokens": tensors["tokens"].detach(), "hidden": tensors["hidden"].detach(),
                 "projected": {n: p.detach() for n, p in tensors["projected"].items()}}
        self.saved[layer] = saved
        for name in ("up", "gate", "down_low_rank"):
            if tensors[name] is not None and tensors[name].requires_grad:
                tensors[name].register_hook(lambda grad, name=name: saved.__setitem__(f"d_{name}", grad))

    def adjust_output(self, layer: SparseMoEFFN, output: torch.Tensor, record) -> torch.Tensor:
        saved = self.saved.get(layer)
        if saved is not None and output.requires_grad:
            saved["probs"] = record.probs.detach()
            saved["experts"] = record.experts
            output.register_hook(lambda grad: saved.__setitem__("d_out", grad))
        return output

    def training_flops(self, layer: SparseMoEFFN, tokens: int) -> float:
        """Per adapted matrix, three (T x E r) products: 2 T E r (in + out + the hidden width h)."""
        if layer.top_k == layer.num_experts:
            return 0.0
        return 2.0 * tokens * layer.num_experts * layer.lora_rank * (layer.d_model + 2 * layer.d_hidden) * len(layer.adapted)

    def compute(self, layer: SparseMoEFFN) -> dict[str, torch.Tensor]:
        """The pseudo-gradients of the layer's LoRA factors, by parameter name (``lora_up_a``, ...).

        Empty when the last forward activated every expert or no backward has run since.
        """
        saved = self.saved.pop(layer, None)
        if saved is None or "d_out" not in saved:
            return {}
        if layer.active_rank != layer.lora_rank:
            raise ValueError("pseudo-gradients assume every client trains the full LoRA rank")
        layout, x, probs = saved["layout"], saved["tokens"], saved["probs"]
        T, E = probs.shape
        active = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, saved["experts"], True)
        active_mass = (probs * active).sum(1, keepdim=True)  # P(x): (T, 1)
        # rho p_i(x) for inactive pairs, repeated over the rank: (T, E, r). Multiplying (T, E, r) tables by a
        # (T, E, 1) broadcast runs an inner loop of r elements, ten times slower than same-shape tensors.
        weight = (probs * ~active * self.rho).unsqueeze(2).expand(T, E, layer.lora_rank).contiguous()
        s = layer.lora_scale
        grads = {}  # fresh intermediates are scaled in place: fewer large allocations, the same numbers
        for name in ("up", "gate"):
            if f"d_{name}" in saved:
                delta_bar = _per_token_sum(saved[f"d_{name}"], layout, T).div_(active_mass)  # (T, h)
                b = getattr(layer, f"lora_{name}_b").detach()  # (E, r, h)
                through_b = (delta_bar @ b.permute(2, 0, 1).reshape(-1, E * b.shape[1])).view(T, E, -1).mul_(s)
                grads |= _factor_grads(name, x, delta_bar, saved["projected"][name], through_b, weight, s)
        hidden_bar = _per_token_sum(saved["hidden"], layout, T).div_(active_mass)  # (T, h)
        a = layer.lora_down_a.detach()  # (E, h, r)
        through_a = (hidden_bar @ a.permute(1, 0, 2).reshape(a.shape[1], -1)).view(T, E, -1)
        through_b = saved["d_down_low_rank"].view(T, E, -1)  # s g(x) B_i^T, from the backward pass
        grads |= _factor_grads("down", hidden_bar, saved["d_out"], through_a, through_b, weight, s)
        return grads

    def apply(self, layer: SparseMoEFFN) -> None:
        """Add the pseudo-gradients to the LoRA factors' gradients."""
        for name, grad in self.compute(layer).items():
            param = getattr(layer, name)
            param.grad = grad.clone() if param.grad is None else param.grad.add_(grad)


def _factor_grads(name: str, inputs: torch.Tensor, deltas: torch.Tensor, through_a: torch.Tensor,
                  through_b: torch.Tensor, weight: torch.Tensor, s: float) -> dict[str, torch.Tensor]:
    """G_hat(x) = inputs(x) deltas(x)^T for every token; inputs: (T, in), deltas: (T, out), weight: (T, E, r),
    through_a = inputs(x) A_i: (T, E, r), through_b = s deltas(x) B_i^T: (T, E, r).

    grad A_i = sum_x w_i(x) inputs(x) (s deltas(x) B_i^T)   -> (E, in, r)
    grad B_i = s sum_x w_i(x) (inputs(x) A_i)^T deltas(x)   -> (E, r, out)
    """
    T, E, r = through_a.shape
    grad_a = (inputs.T @ (through_b * weight).reshape(T, E * r)).view(-1, E, r).permute(1, 0, 2)
    grad_b = ((through_a * (weight * s)).reshape(T, E * r).T @ deltas).view(E, r, -1)
    return {f"lora_{name}_a": grad_a, f"lora_{name}_b": grad_b}


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
