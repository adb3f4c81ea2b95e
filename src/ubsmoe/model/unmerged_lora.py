"""Expert projections for experts too large to merge (``GroupedExperts.merges``): the frozen product per slot
and the LoRA apart, with hand-written backward passes that follow ``grouped_lora``'s protocol (the same
inputs, outputs, ``ExtraRows`` and gradients), so that what a step holds grows with the slots (with K),
not with every expert's d x h."""

from __future__ import annotations

import torch

from ubsmoe.model.grouped_lora import (_down_b_grad, _every_expert_input, _every_expert_input_factor_grad,
                                       _no_hook_rows, _require_frozen, _through_b, grouped_mm, grouped_narrow,
                                       grouped_outer)


def frozen_product(values: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of group e times the frozen w[e] in w's own dtype (a bf16 model's experts run in bf16, as
    grouped kernels want), returned in ``values``' dtype. values: (S, in), w: (E, in, out) -> (S, out)."""
    return grouped_mm(values.to(w.dtype), w, ends, counts).to(values.dtype)


class UnmergedUpProjection(torch.autograd.Function):
    """``GroupedUpProjection`` without merged weights, for large experts: the frozen product per slot and the
    LoRA apart, x_t W_e + s (x_t A_e) B_e, so that what a training step holds beyond the frozen weights
    grows with the slots (with K), not with every expert's d x h. Same inputs, outputs, ``extra_rows``
    protocol and gradients. The frozen product runs in w's dtype (bf16 stays bf16), the LoRA in float32.

    Kept for the backward: x (T, d), which the layer keeps anyway, x A_e for every token and expert (T, E r)
    when a hook reads every expert (``every_expert``; the pseudo-gradient's factor products do), and x_t A_e
    per slot (S, r); neither the slots' gathered inputs (S, d) nor any (E, d, h) tensor. Without
    ``every_expert`` the gradient of A_e is grouped over its slots, as the merged path's.
    """

    @staticmethod
    def forward(ctx, x, a, w, b, bias, scale, token, pair, ends, counts, name, extra_rows, every_expert=True):
        _require_frozen(w)
        num_experts, _, rank = a.shape
        inputs = x.index_select(0, token)  # (S, d)
        if every_expert:
            projected = _every_expert_input(ctx, x, a)  # x A_e: (T, E r), or (T, 0) without LoRA gradients
        else:
            projected = x.new_empty(x.shape[0], 0)
            ctx.mark_non_differentiable(projected)
        slot_projected = (projected.view(-1, rank).index_select(0, pair) if projected.shape[1]
                          else grouped_narrow(inputs, a, counts))  # x_t A_e: (S, r)
        out = frozen_product(inputs, w, ends, counts)
        out.add_(grouped_mm(slot_projected, b, ends, counts), alpha=scale)
        if bias is not None:
            out += bias.index_select(0, pair % num_experts).to(out.dtype)
        ctx.save_for_backward(x, w, a, b, projected, slot_projected, token, pair, ends)
        ctx.scale, ctx.counts, ctx.name, ctx.extra_rows, ctx.every_expert = scale, counts, name, extra_rows, every_expert
        return out, projected

    @staticmethod
    def backward(ctx, grad, _):
        x, w, a, b, projected, slot_projected, token, pair, ends = ctx.saved_tensors
        num_tokens, d = x.shape
        grad = grad.contiguous()
        through_b = grouped_mm(grad, b.transpose(1, 2), ends, ctx.counts).mul_(ctx.scale)  # s g B_eᵀ: (S, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_inputs = frozen_product(grad, w.transpose(1, 2), ends, ctx.counts)
            grad_inputs += grouped_mm(through_b, a.transpose(1, 2), ends, ctx.counts)  # (S, d)
            grad_x = grad.new_zeros(num_tokens, d).index_add_(0, token, grad_inputs)
        if ctx.needs_input_grad[1] and ctx.every_expert:
            grad_a = _every_expert_input_factor_grad(x, through_b, pair, a.shape[0], ctx.extra_rows, ctx.name)
        elif ctx.needs_input_grad[1]:
            _no_hook_rows(ctx, ctx.name)
            grad_a = grouped_outer(x.index_select(0, token), through_b, ends, ctx.counts)
        if ctx.needs_input_grad[3]:
            grad_b = grouped_outer(slot_projected, grad, ends, ctx.counts).mul_(ctx.scale)
        return grad_x, grad_a, None, grad_b, None, None, None, None, None, None, None, None, None


class UnmergedDownProjection(torch.autograd.Function):
    """``GroupedDownProjection`` without merged weights, for large experts: per slot hidden W_e + s (hidden
    A_e) B_e, scattered to tokens. Same inputs, output, ``extra_rows`` protocol and gradients; the frozen
    product runs in w's dtype, the LoRA in float32. Kept for the backward: hidden (S, h) and hidden A_e
    (S, r); no (E, h, d) tensor.
    """

    @staticmethod
    def forward(ctx, hidden, w, a, b, scale, token, pair, num_tokens, ends, counts, extra_rows, every_expert=True):
        _require_frozen(w)
        low_rank = grouped_mm(hidden, a, ends, counts)  # hidden A_e: (S, r)
        out = frozen_product(hidden, w, ends, counts)
        out.add_(grouped_mm(low_rank, b, ends, counts), alpha=scale)  # (S, d)
        y = hidden.new_zeros(num_tokens, out.shape[1]).index_add_(0, token, out)
        ctx.save_for_backward(hidden, w, a, b, low_rank, token, pair, ends)
        ctx.scale, ctx.counts, ctx.extra_rows, ctx.every_expert = scale, counts, extra_rows, every_expert
        return y

    @staticmethod
    def backward(ctx, grad_y):
        hidden, w, a, b, low_rank, token, pair, ends = ctx.saved_tensors
        num_experts, rank = b.shape[:2]
        grad_y = grad_y.contiguous()
        slot_grad = grad_y.index_select(0, token)  # (S, d)
        if ctx.every_expert:
            through_b = _through_b(grad_y, b, ctx.scale)  # s g B_iᵀ for every token and expert: (T, E r)
            ctx.extra_rows.down_through_b = through_b
            slot_through_b = through_b.view(-1, rank).index_select(0, pair)  # (S, r)
        else:
            slot_through_b = grouped_narrow(slot_grad, b.transpose(1, 2), ctx.counts).mul_(ctx.scale)
        grad_hidden = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_hidden = frozen_product(slot_grad, w.transpose(1, 2), ends, ctx.counts)
            grad_hidden += grouped_mm(slot_through_b, a.transpose(1, 2), ends, ctx.counts)
        if ctx.needs_input_grad[2]:
            grad_a = grouped_outer(hidden, slot_through_b, ends, ctx.counts)
        if ctx.needs_input_grad[3] and ctx.every_expert:
            grad_b = _down_b_grad(grad_y, low_rank, pair, num_experts, ctx.scale, ctx.extra_rows)
        elif ctx.needs_input_grad[3]:
            _no_hook_rows(ctx, "down")
            grad_b = grouped_outer(low_rank, slot_grad, ends, ctx.counts).mul_(ctx.scale)
        return grad_hidden, None, grad_a, grad_b, None, None, None, None, None, None, None, None
