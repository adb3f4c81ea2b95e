"""The gate and up projections of gated (SwiGLU) experts on their slots as one grouped matmul.

A gated expert reads its slots' inputs twice, once through W_gate and once through W_up. Run as two
``GroupedUpProjection``s, each gathers the slots' inputs, runs its own small grouped matmuls forward and
backward and scatters its own input gradient; at a weak client's few rows per expert those fixed costs
weigh. Here the merged weights of both sit side by side in one (E, padded + 2r, 2h) weight, so that one
gather, one grouped matmul forward, one backward and one scatter serve both; the backward's matmul
carries s B_gate and s B_up as 2r extra columns (``grouped_lora``'s protocol), and every LoRA gradient,
hook rows (``ExtraRows.gate`` / ``.up``) and the every-expert products are those of the two projections
apart, up to the order of float32 summation.
"""

from __future__ import annotations

import torch

from ubsmoe.model.grouped_lora import (_every_expert_input_factor_grad, _merged_or_parts, _no_hook_rows,
                                       _require_frozen, _slot_inputs, grouped_mm, grouped_narrow, grouped_outer)
from ubsmoe.model.matmul import narrow_product

_A_GRAD, _B_GRAD = {"gate": 1, "up": 2}, {"gate": 5, "up": 6}  # input positions of each factor in ``forward``


class GroupedGateUpProjection(torch.autograd.Function):
    """Slots' gate and up projections through their merged weights, W_e + s A_e B_e each, as one grouped matmul.

    forward(x (T, d), a_gate, a_up (E, d, r), w_gate, w_up (E, d, h), b_gate, b_up (E, r, h), bias (E, h) or
    None (the up projection's), scale, token (S,), pair (S,), ends, counts, extra_rows (``ExtraRows``),
    keep_merged, every_expert) -> (out (S, 2h) = [gate | up] per slot, projected_gate, projected_up
    (T, E r): x A_e for every token and expert, not differentiable; (T, 0) when no LoRA factor needs a
    gradient or ``every_expert`` is False).
    """

    @staticmethod
    def forward(ctx, x, a_gate, a_up, w_gate, w_up, b_gate, b_up, bias, scale, token, pair, ends, counts, extra_rows,
                keep_merged, every_expert):
        _require_frozen(w_gate)
        _require_frozen(w_up)
        num_tokens, d = x.shape
        rank = a_up.shape[2]
        inputs = _slot_inputs(x, token, bias is not None, 2 * rank)  # (S, d [+ 1] + padding)
        padded = inputs.shape[1]
        weight = _merged_gate_up(w_gate, w_up, a_gate, a_up, b_gate, b_up, bias, scale, padded)
        lora_grad = any(ctx.needs_input_grad[i] for i in (*_A_GRAD.values(), *_B_GRAD.values()))
        if every_expert and lora_grad:  # x A_e: (T, E r) for each projection
            projected = [narrow_product(x, a.permute(1, 0, 2).reshape(d, -1)).contiguous() for a in (a_gate, a_up)]
        else:
            projected = [x.new_empty(num_tokens, 0), x.new_empty(num_tokens, 0)]
        ctx.mark_non_differentiable(*projected)
        parts = _merged_or_parts(keep_merged, weight, w_gate, w_up, b_gate, b_up, bias)
        ctx.save_for_backward(x, inputs, *projected, token, pair, ends, a_gate, a_up, *parts)
        ctx.scale, ctx.counts, ctx.extra_rows, ctx.every_expert = scale, counts, extra_rows, every_expert
        return grouped_mm(inputs, weight[:, :padded], ends, counts), *projected

    @staticmethod
    def backward(ctx, grad, _gate, _up):
        (x, inputs, projected_gate, projected_up, token, pair, ends, a_gate, a_up,
         weight, w_gate, w_up, b_gate, b_up, bias) = ctx.saved_tensors
        num_tokens, d = x.shape
        padded, rank = inputs.shape[1], a_up.shape[2]
        if weight is None:
            weight = _merged_gate_up(w_gate, w_up, a_gate, a_up, b_gate, b_up, bias, ctx.scale, padded)
        h = grad.shape[1] // 2
        grad = grad.contiguous()
        grad_inputs = grouped_mm(grad, weight.transpose(1, 2), ends, ctx.counts)  # (S, padded + 2r)
        grads: list[torch.Tensor | None] = [None] * 16
        if ctx.needs_input_grad[0]:
            # Scatter the full contiguous rows: index_add_ is several times slower on a column slice.
            grads[0] = grad.new_zeros(num_tokens, grad_inputs.shape[1]).index_add_(0, token, grad_inputs)[:, :d]
        slot_rows = grad_inputs[:, padded:]  # s grad_gate B_gateᵀ | s grad_up B_upᵀ per slot: (S, 2r)
        a_needed = [ctx.needs_input_grad[_A_GRAD[name]] for name in ("gate", "up")]
        if any(a_needed) and not ctx.every_expert:  # both A gradients from one grouped product over the slots
            for name in ("gate", "up"):
                _no_hook_rows(ctx, name)
            both = grouped_outer(inputs[:, :d], slot_rows, ends, ctx.counts)  # (E, d, 2r)
            for i, name in enumerate(("gate", "up")):
                grads[_A_GRAD[name]] = both[..., i * rank:(i + 1) * rank].contiguous() if a_needed[i] else None
        for i, (name, a, projected) in enumerate((("gate", a_gate, projected_gate), ("up", a_up, projected_up))):
            if a_needed[i] and ctx.every_expert:
                grads[_A_GRAD[name]] = _every_expert_input_factor_grad(
                    x, slot_rows[:, i * rank:(i + 1) * rank], pair, a.shape[0], ctx.extra_rows, name)
            if ctx.needs_input_grad[_B_GRAD[name]]:
                slot_projected = (projected.view(-1, rank).index_select(0, pair) if ctx.every_expert
                                  else grouped_narrow(inputs[:, :d], a, ctx.counts))  # x_t A_e per slot: (S, r)
                grads[_B_GRAD[name]] = grouped_outer(slot_projected, grad[:, i * h:(i + 1) * h], ends,
                                                     ctx.counts).mul_(ctx.scale)
        return tuple(grads)


def _merged_gate_up(w_gate: torch.Tensor, w_up: torch.Tensor, a_gate: torch.Tensor, a_up: torch.Tensor,
                    b_gate: torch.Tensor, b_up: torch.Tensor, bias: torch.Tensor | None, scale: float,
                    padded: int) -> torch.Tensor:
    """The fused weight (E, padded + 2r, 2h): rows [0, d) hold the merged W + s A B of gate (columns [0, h)) and
    up ([h, 2h)), row d the up bias, zero rows up to ``padded``, then s B_gate under the gate columns and
    s B_up under the up columns (for the backward)."""
    with torch.no_grad():
        num_experts, d, h = w_up.shape
        rank = a_up.shape[2]
        weight = w_up.new_zeros(num_experts, padded + 2 * rank, 2 * h)
        weight[:, :d, :h] = torch.baddbmm(w_gate, a_gate, b_gate, alpha=scale)
        weight[:, :d, h:] = torch.baddbmm(w_up, a_up, b_up, alpha=scale)
        if bias is not None:
            weight[:, d, h:] = bias
        weight[:, padded:padded + rank, :h] = b_gate * scale
        weight[:, padded + rank:, h:] = b_up * scale
        return weight
