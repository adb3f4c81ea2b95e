"""Expert projections with LoRA fused into the frozen grouped matmul, with hand-written backward passes.

A rank-r LoRA costs few FLOPs but, done as separate matmuls, several extra passes over the (slots,
hidden) activations, which on a CPU cost as much as the frozen matmul itself. Here the low-rank factor
rides along as r extra columns of the frozen matmul's input (up-projection) or output (down-projection),
so each activation is read and written once. The backward passes compute input gradients and LoRA
gradients only: the frozen expert weights never get a weight gradient.

Slots are the S = T*K (token, expert) pairs sorted by expert (``SlotLayout``); ``pair`` indexes the
flattened (T, E) table of a token's projections for every expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HAS_GROUPED_MM = hasattr(F, "grouped_mm")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of group e times w[e]. x: (S, in), w: (E, in, out), ends: (E,) int32 group ends -> (S, out)."""
    if w.shape[0] == 1:
        return x @ w[0]
    if _HAS_GROUPED_MM and x.dtype in _GROUPED_MM_DTYPES and _aligned(x.shape[1], x) and _aligned(w.shape[2], x):
        return F.grouped_mm(x, w, offs=ends)
    return torch.cat([part @ w[e] for e, part in enumerate(x.split(counts))])


def _aligned(width: int, like: torch.Tensor) -> bool:
    """Grouped matmul kernels need rows of a multiple of 16 bytes."""
    return (width * like.element_size()) % 16 == 0


def _padded_width(width: int) -> int:
    return -(-width // 4) * 4


def grouped_outer(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-group a_eᵀ b_e. a: (S, m), b: (S, n) -> (E, m, n): the weight gradient of a grouped matmul."""
    # A loop of transposed views: BLAS reads aᵀ in place, where the grouped kernel needs a copy of it.
    if b.shape[1] < a.shape[1]:  # a narrow right factor: (b_eᵀ a_e)ᵀ ran 2.5 times faster alone (h = 192, r = 8)
        return torch.stack([pb.T @ pa for pa, pb in zip(a.split(counts), b.split(counts))]).transpose(1, 2)
    return torch.stack([pa.T @ pb for pa, pb in zip(a.split(counts), b.split(counts))])


class GroupedUpProjection(torch.autograd.Function):
    """Slots' frozen up-projection plus LoRA, as one grouped matmul.

    forward(x (T, d), projected (T*E, r) = x A_e for every token and expert, w (E, d, h), b (E, r, h),
    bias (E, h) or None, scale, token (S,), pair (S,), ends, counts)
    -> (S, h) = x_t W_e + scale * (x_t A_e) B_e + bias_e per slot. The frozen bias rides as a column of ones.
    """

    @staticmethod
    def forward(ctx, x, projected, w, b, bias, scale, token, pair, ends, counts):
        _require_frozen(w)
        d, rank = x.shape[1], projected.shape[1]
        width = d + rank + (bias is not None)
        padded = _padded_width(width)  # grouped matmuls need rows of a multiple of 16 bytes
        inputs = x.new_empty(token.shape[0], padded)  # (S, d + r [+ 1] + padding)
        torch.index_select(x, 0, token, out=inputs[:, :d])
        torch.index_select(projected, 0, pair, out=inputs[:, d : d + rank])
        inputs[:, d + rank :] = 0.0
        parts = [w, b * scale]
        if bias is not None:
            inputs[:, d + rank] = 1.0
            parts.append(bias.unsqueeze(1))
        parts.append(w.new_zeros(w.shape[0], padded - width, w.shape[2]))
        weight = torch.cat(parts, 1)  # (E, padded, h)
        ctx.save_for_backward(inputs, weight, token, pair, ends)
        ctx.rank = rank
        ctx.scale, ctx.counts, ctx.shapes = scale, counts, (x.shape, projected.shape)
        return grouped_mm(inputs, weight, ends, counts)

    @staticmethod
    def backward(ctx, grad):
        inputs, weight, token, pair, ends = ctx.saved_tensors
        x_shape, projected_shape = ctx.shapes
        d = x_shape[1]
        rank = ctx.rank
        grad = grad.contiguous()
        grad_inputs = grouped_mm(grad, weight.transpose(1, 2), ends, ctx.counts)  # (S, d + r [+ 1])
        grad_x = grad_projected = grad_b = None
        if ctx.needs_input_grad[0]:
            # Scatter the full contiguous rows: index_add_ is several times slower on a column slice.
            grad_x = grad.new_zeros(x_shape[0], grad_inputs.shape[1]).index_add_(0, token, grad_inputs)[:, :d]
        if ctx.needs_input_grad[1]:
            grad_projected = grad.new_zeros(projected_shape).index_copy_(0, pair, grad_inputs[:, d : d + rank])
        if ctx.needs_input_grad[3]:
            grad_b = grouped_outer(inputs[:, d : d + rank], grad, ends, ctx.counts) * ctx.scale
        return grad_x, grad_projected, None, grad_b, None, None, None, None, None, None


class GroupedDownProjection(torch.autograd.Function):
    """Slots' frozen down-projection plus the LoRA down-factor, as one grouped matmul, scattered to tokens.

    forward(hidden (S, h), w (E, h, d), a (E, h, r), token (S,), pair (S,), num_tokens, ends, counts)
    -> (y (T, d) = sum over a token's slots of hidden W_e, low_rank (T*E, r) = hidden A_e at each
    active (token, expert) pair and zero elsewhere). The caller finishes the LoRA with one token-level
    matmul of low_rank by the stacked B factors.
    """

    @staticmethod
    def forward(ctx, hidden, w, a, token, pair, num_tokens, ends, counts):
        _require_frozen(w)
        d, rank = w.shape[2], a.shape[2]
        padding = _padded_width(d + rank) - d - rank  # aligned rows for the grouped kernel
        parts = [w, a] + ([w.new_zeros(w.shape[0], w.shape[1], padding)] if padding else [])
        weight = torch.cat(parts, 2)  # (E, h, d + r + padding)
        out = grouped_mm(hidden, weight, ends, counts)[:, : d + rank]  # (S, d + r)
        y = hidden.new_zeros(num_tokens, d + rank).index_add_(0, token, out)[:, :d]
        low_rank = hidden.new_zeros(num_tokens * w.shape[0], rank).index_copy_(0, pair, out[:, d:])
        ctx.save_for_backward(hidden, weight, token, pair, ends)
        ctx.counts = counts
        return y, low_rank

    @staticmethod
    def backward(ctx, grad_y, grad_low_rank):
        hidden, weight, token, pair, ends = ctx.saved_tensors
        d = grad_y.shape[1]
        rank = grad_low_rank.shape[1]
        grad_out = grad_y.new_empty(token.shape[0], weight.shape[2])  # (S, d + r + padding)
        torch.index_select(grad_y, 0, token, out=grad_out[:, :d])
        torch.index_select(grad_low_rank, 0, pair, out=grad_out[:, d : d + rank])
        grad_out[:, d + rank :] = 0.0
        grad_hidden = grad_a = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grouped_mm(grad_out, weight.transpose(1, 2), ends, ctx.counts)
        if ctx.needs_input_grad[2]:
            grad_a = grouped_outer(hidden, grad_out[:, d : d + rank], ends, ctx.counts)
        return grad_hidden, None, grad_a, None, None, None, None, None


def _require_frozen(w: torch.Tensor) -> None:
    if w.requires_grad:
        raise ValueError("fused LoRA projections compute no gradient for the expert weights: freeze them")
