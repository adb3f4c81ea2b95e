"""Expert projections with LoRA merged into the frozen grouped matmul, with hand-written backward passes.

A rank-r LoRA costs few FLOPs but, done as separate matmuls, several extra passes over the (slots,
hidden) activations, which on a CPU cost as much as the frozen matmul itself. Here each expert's
projection runs through its merged weight W_e + s A_e B_e (E d h r FLOPs per matrix, once per batch),
and what the LoRA gradients need rides along as r extra columns of a matmul that runs anyway: A_e in the
down-projection's forward, s B_e in the up-projection's backward. The backward passes compute input
gradients and LoRA gradients only: the frozen expert weights never get a weight gradient.

The gradient of the factor on the model-width side (A of up and gate, B of down) is taken per slot, over
the S = T K pairs that ran (``every_expert=False``, what a layer passes unless a hook asks for more:
``GroupedExperts.expert_outputs``), or, when a method hook reads every
expert (``MoEHook.reads_every_expert``: the pseudo-gradient), as one dense product over all T E (token,
expert) pairs with zero rows at the inactive pairs, to which the hook adds its own rows
(``extra_rows``): that is how the pseudo-gradient reaches inactive experts' A_up and B_down without a
product of its own. At K = 2 of 8 the per-slot products are a quarter of the dense ones; both give the
same gradients up to the order of summation.

Slots are the S = T*K (token, expert) pairs sorted by expert (``SlotLayout``); ``pair`` indexes the
flattened (T, E) table of a token's projections for every expert.

Each keeps its merged weights for the backward (``keep_merged``), or forms them again there from the
parameters, bit for bit the same, so that a low-memory client (``train.activation_checkpointing``) keeps no
(E, d, h) tensor per matrix: E d h r multiply-adds per matrix, a small share of the slots' products.

When every expert takes every token (K = M, or a dense FFN with one expert), ``DenseUpProjection`` and
``DenseDownProjection`` do the same with no slots: one wide matmul through the merged weights of all
experts, and the rank-r products batched over experts. Products with fewer than 16 output columns run
in MKL's fast orientation (``matmul.narrow_product``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ubsmoe.model.expert_observation import ExtraRows
from ubsmoe.model.matmul import narrow_product


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


def _round_up(width: int, multiple: int) -> int:
    return -(-width // multiple) * multiple


def _up_input_width(width: int, rank: int) -> int:
    """Columns of the up-projection's gathered inputs: at least ``width``, a multiple of 4 (16-byte rows
    for the grouped kernels) and, when the rank allows, such that the backward's (S, padded + r) product
    has rows of a multiple of 64 bytes: MKL ran those products 8-17 % faster alone at the default model's
    sizes (a whole layer, 1-2 %)."""
    padded = _round_up(width, 4)
    return _round_up(padded + rank, 16) - rank if rank % 4 == 0 else padded


def _slot_inputs(x: torch.Tensor, token: torch.Tensor, bias: bool, extra_columns: int) -> torch.Tensor:
    """The slots' inputs for an up-projection: x (T, d) gathered by ``token`` (S,) into (S, padded) rows, then a
    column of ones for the frozen bias when there is one, then zeros up to ``_up_input_width``."""
    d = x.shape[1]
    inputs = x.new_empty(token.shape[0], _up_input_width(d + bias, extra_columns))
    torch.index_select(x, 0, token, out=inputs[:, :d])
    inputs[:, d:] = 0.0
    if bias:
        inputs[:, d] = 1.0
    return inputs


def _every_expert_input(ctx, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x A_e for every token and expert, (T, E r), when a LoRA factor needs a gradient; (T, 0) otherwise
    (evaluation). x: (T, d), a: (E, d, r). Not differentiable."""
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
        projected = narrow_product(x, a.permute(1, 0, 2).reshape(x.shape[1], -1)).contiguous()
    else:
        projected = x.new_empty(x.shape[0], 0)
    ctx.mark_non_differentiable(projected)
    return projected


def _no_hook_rows(ctx, name: str) -> None:
    """Per-slot mode has no (T, E r) rows for a hook to join: a hook that adds some must read every expert."""
    if ctx.extra_rows.take(name) is not None:
        raise RuntimeError(f"a hook added {name} rows to a layer computing per slot: hooks that add rows must "
                           "set reads_every_expert")


def grouped_narrow(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Rows of group e times w[e] for a narrow w (few output columns: a LoRA rank), each product in MKL's fast
    orientation (``narrow_product``). x: (S, in), may be a column slice; w: (E, in, r) -> (S, r)."""
    return torch.cat([narrow_product(part, w[e]) for e, part in enumerate(x.split(counts))])


def _input_factor_grad(x: torch.Tensor, rows: torch.Tensor, rank: int) -> torch.Tensor:
    """Gradient of every expert's A from its rows: xᵀ rows. x: (T, d), rows: (T, E r) -> (E, d, r)."""
    return narrow_product(x.T, rows).reshape(x.shape[1], -1, rank).permute(1, 0, 2)


def _every_expert_input_factor_grad(x: torch.Tensor, slot_rows: torch.Tensor, pair: torch.Tensor, num_experts: int,
                                    extra_rows: ExtraRows, name: str) -> torch.Tensor:
    """Gradient of every expert's A as one dense product over every (token, expert) pair: the slots' rows
    (s grad B_eᵀ per slot, (S, r)) placed at their ``pair`` in a (T, E r) table that is zero at the inactive
    pairs, plus a hook's rows for ``name`` (``ExtraRows``), then xᵀ rows. x: (T, d), pair: (S,) -> (E, d, r)."""
    num_tokens, rank = x.shape[0], slot_rows.shape[1]
    rows = slot_rows.new_zeros(num_tokens * num_experts, rank).index_copy_(0, pair, slot_rows)
    rows = rows.view(num_tokens, num_experts * rank)
    extra = extra_rows.take(name)
    if extra is not None:
        rows += extra
    return _input_factor_grad(x, rows, rank)


def _through_b(grad_y: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """s g B_eᵀ for every token and expert: grad_y (T, d), b (E, r, d) -> (T, E r), contiguous."""
    return narrow_product(grad_y, b.permute(2, 0, 1).reshape(b.shape[2], -1)).mul_(scale).contiguous()


def grouped_outer(a: torch.Tensor, b: torch.Tensor, ends: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Per-group a_eᵀ b_e. a: (S, m), b: (S, n) -> (E, m, n): the weight gradient of a grouped matmul."""
    # A loop of transposed views: BLAS reads aᵀ in place, where the grouped kernel needs a copy of it.
    return torch.stack([narrow_product(pa.T, pb) for pa, pb in zip(a.split(counts), b.split(counts))])


class GroupedUpProjection(torch.autograd.Function):
    """Slots' up-projection through the merged weight W_e + s A_e B_e, as one grouped matmul.

    forward(x (T, d), a (E, d, r), w (E, d, h), b (E, r, h), bias (E, h) or None, scale, token (S,),
    pair (S,), ends, counts, name, extra_rows (``ExtraRows``), keep_merged, every_expert) -> (out (S, h) =
    x_t (W_e + s A_e B_e) + bias_e per slot, projected (T, E r) = x A_i for every token and expert, not
    differentiable; (T, 0) when no LoRA factor needs a gradient or ``every_expert`` is False).

    The backward matmul carries s B_e as r extra columns, so it yields the input gradient through the
    merged weight and, per slot, s grad B_eᵀ: the rows whose product with the slots' inputs gives the
    gradient of A_e, grouped per expert, or with every_expert one dense product over every pair, grad A =
    xᵀ rows (rows: (T, E r), zero at inactive pairs), to which a hook may add rows of its own before this
    backward runs (``extra_rows.up`` / ``.gate``; the pseudo-gradient does), for free. The gradient of
    B_e is the grouped (x_t A_e)ᵀ grad. The frozen bias rides as a column of ones.
    """

    @staticmethod
    def forward(ctx, x, a, w, b, bias, scale, token, pair, ends, counts, name, extra_rows, keep_merged,
                every_expert=True):
        _require_frozen(w)
        inputs = _slot_inputs(x, token, bias is not None, a.shape[2])  # (S, d [+ 1] + padding)
        padded = inputs.shape[1]
        weight = _merged_up(w, a, b, bias, scale, padded)
        if every_expert:
            projected = _every_expert_input(ctx, x, a)  # x A_e: (T, E r)
        else:  # per slot: x_t A_e is formed in the backward from the gathered inputs
            projected = x.new_empty(x.shape[0], 0)
            ctx.mark_non_differentiable(projected)
        # Without keep_merged the backward forms the merged weight again from the parameters (the same numbers)
        parts = _merged_or_parts(keep_merged, weight, w, b, bias)
        ctx.save_for_backward(x, inputs, projected, token, pair, ends, a, *parts)
        ctx.scale, ctx.counts, ctx.name, ctx.extra_rows, ctx.every_expert = scale, counts, name, extra_rows, every_expert
        return grouped_mm(inputs, weight[:, :padded], ends, counts), projected

    @staticmethod
    def backward(ctx, grad, _):
        x, inputs, projected, token, pair, ends, a, weight, w, b, bias = ctx.saved_tensors
        num_tokens, d = x.shape
        padded = inputs.shape[1]
        if weight is None:
            weight = _merged_up(w, a, b, bias, ctx.scale, padded)
        rank = weight.shape[1] - padded
        grad = grad.contiguous()
        grad_inputs = grouped_mm(grad, weight.transpose(1, 2), ends, ctx.counts)  # (S, padded + r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            # Scatter the full contiguous rows: index_add_ is several times slower on a column slice.
            grad_x = grad.new_zeros(num_tokens, grad_inputs.shape[1]).index_add_(0, token, grad_inputs)[:, :d]
        slot_rows = grad_inputs[:, padded:]  # s grad B_eᵀ per slot: (S, r)
        if ctx.needs_input_grad[1] and ctx.every_expert:
            grad_a = _every_expert_input_factor_grad(x, slot_rows, pair, a.shape[0], ctx.extra_rows, ctx.name)
        elif ctx.needs_input_grad[1]:
            _no_hook_rows(ctx, ctx.name)
            grad_a = grouped_outer(inputs[:, :d], slot_rows, ends, ctx.counts)
        if ctx.needs_input_grad[3]:
            slot_projected = (projected.view(-1, rank).index_select(0, pair) if ctx.every_expert
                              else grouped_narrow(inputs[:, :d], a, ctx.counts))  # x_t A_e per slot: (S, r)
            grad_b = grouped_outer(slot_projected, grad, ends, ctx.counts).mul_(ctx.scale)
        return grad_x, grad_a, None, grad_b, None, None, None, None, None, None, None, None, None, None


def _merged_or_parts(keep_merged: bool, merged: torch.Tensor, *parts: torch.Tensor | None) -> tuple:
    """What a projection keeps to have its merged weight in the backward: the merged weight itself and Nones
    for ``parts``, or None and the parts: the frozen weight and the factors, the model's own tensors in a
    float32 model. In a bf16 model the frozen weight arrives as a float32 copy as large as the merged weight,
    so forming it again saves nothing there."""
    return (merged, *(None,) * len(parts)) if keep_merged else (None, *parts)


def _merged_up(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, scale: float,
               padded: int) -> torch.Tensor:
    """The up-projection's weight, (E, padded + r, h): merged W + s A B, the bias row, zero rows up to
    ``padded``, then s B (for the backward). w: (E, d, h), a: (E, d, r), b: (E, r, h), bias: (E, h) or None."""
    with torch.no_grad():
        num_experts, width = a.shape[0], w.shape[1] + (bias is not None)
        parts = [torch.baddbmm(w, a, b, alpha=scale)]
        if bias is not None:
            parts.append(bias.unsqueeze(1))
        parts += [w.new_zeros(num_experts, padded - width, w.shape[2]), b * scale]
        return torch.cat(parts, 1)


class GroupedDownProjection(torch.autograd.Function):
    """Slots' down-projection through the merged weight W_e + s A_e B_e, as one grouped matmul, scattered
    to tokens.

    forward(hidden (S, h), w (E, h, d), a (E, h, r), b (E, r, d), scale, token (S,), pair (S,), num_tokens,
    ends, counts, extra_rows (``ExtraRows``), keep_merged, every_expert) -> y (T, d) = sum over a token's
    slots of hidden (W_e + s A_e B_e).

    The forward matmul carries A_e as r extra columns: hidden A_e per slot, kept for the backward. The
    backward forms s g B_eᵀ per slot, from which the gradient of A_e is the grouped hiddenᵀ (s g B_eᵀ),
    and the gradient of B_e as the grouped (s hidden A_e)ᵀ g. With ``every_expert`` it forms s g B_iᵀ
    for every token and expert in one dense product (T, E r) and leaves it in
    ``extra_rows.down_through_b`` for hooks, and the gradient of every B_i is one dense product rowsᵀ g
    with rows = s hidden A_e at the active pairs plus a hook's ``extra_rows.down`` (set during the forward).
    """

    @staticmethod
    def forward(ctx, hidden, w, a, b, scale, token, pair, num_tokens, ends, counts, extra_rows, keep_merged,
                every_expert=True):
        _require_frozen(w)
        num_experts, _, d = w.shape
        rank = a.shape[2]
        padding = _round_up(d + rank, 16) - d - rank  # rows of a multiple of 64 bytes (``_up_input_width``)
        merged = torch.baddbmm(w, a, b, alpha=scale)
        if ctx.needs_input_grad[3]:  # the A columns, for B's gradient
            weight = torch.cat([merged, a] + ([w.new_zeros(num_experts, w.shape[1], padding)] if padding else []), 2)
        else:
            weight = merged
        out = grouped_mm(hidden, weight, ends, counts)  # (S, d [+ r + padding])
        # Scatter the full contiguous rows: index_add_ is several times slower on a column slice.
        y = hidden.new_zeros(num_tokens, out.shape[1]).index_add_(0, token, out)[:, :d]
        low_rank = out[:, d : d + rank].clone() if ctx.needs_input_grad[3] else None  # hidden A_e: (S, r)
        # Without keep_merged the backward forms the merged weight again from the parameters (the same numbers)
        ctx.save_for_backward(hidden, low_rank, b, token, pair, ends, *_merged_or_parts(keep_merged, weight, w, a))
        ctx.scale, ctx.counts, ctx.extra_rows, ctx.every_expert = scale, counts, extra_rows, every_expert
        return y

    @staticmethod
    def backward(ctx, grad_y):
        hidden, low_rank, b, token, pair, ends, weight, w, a = ctx.saved_tensors
        num_experts, rank, d = b.shape
        if weight is None:
            with torch.no_grad():
                weight = torch.baddbmm(w, a, b, alpha=ctx.scale)
        grad_y = grad_y.contiguous()
        slot_grad = grad_y.index_select(0, token)  # (S, d)
        if ctx.every_expert:
            through_b = _through_b(grad_y, b, ctx.scale)  # s g B_iᵀ: (T, E r)
            ctx.extra_rows.down_through_b = through_b
            slot_through_b = through_b.view(-1, rank).index_select(0, pair)  # (S, r)
        else:
            slot_through_b = grouped_narrow(slot_grad, b.transpose(1, 2), ctx.counts).mul_(ctx.scale)
        grad_hidden = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_hidden = grouped_mm(slot_grad, weight[:, :, :d].transpose(1, 2), ends, ctx.counts)
        if ctx.needs_input_grad[2]:
            grad_a = grouped_outer(hidden, slot_through_b, ends, ctx.counts)
        if ctx.needs_input_grad[3] and ctx.every_expert:
            grad_b = _down_b_grad(grad_y, low_rank, pair, num_experts, ctx.scale, ctx.extra_rows)
        elif ctx.needs_input_grad[3]:
            _no_hook_rows(ctx, "down")
            grad_b = grouped_outer(low_rank, slot_grad, ends, ctx.counts).mul_(ctx.scale)
        return grad_hidden, None, grad_a, grad_b, None, None, None, None, None, None, None, None, None


def _down_b_grad(grad_y: torch.Tensor, low_rank: torch.Tensor, pair: torch.Tensor, num_experts: int, scale: float,
                 extra_rows: ExtraRows) -> torch.Tensor:
    """Gradient of every B_e of a down-projection as one dense product rowsᵀ g: rows (T, E r) hold s hidden A_e
    at the active pairs (``low_rank``: (S, r)) plus a hook's ``extra_rows.down``. grad_y: (T, d) -> (E, r, d)."""
    num_tokens, rank = grad_y.shape[0], low_rank.shape[1]
    rows = grad_y.new_zeros(num_tokens * num_experts, rank).index_copy_(0, pair, low_rank)
    rows = rows.view(num_tokens, -1).mul_(scale)
    extra = extra_rows.take("down")
    if extra is not None:
        rows += extra
    return (rows.T @ grad_y).view(num_experts, rank, grad_y.shape[1])


def _require_frozen(w: torch.Tensor) -> None:
    if w.requires_grad:
        raise ValueError("fused LoRA projections compute no gradient for the expert weights: freeze them")


class DenseUpProjection(torch.autograd.Function):
    """Every expert's up-projection of every token (K = M, or a dense FFN) through the merged weights, as
    one wide matmul.

    forward(x (T, d), a (E, d, r), w (E, d, h), b (E, r, h), bias (E, h) or None, scale, keep_merged) -> (out (T, E, h)
    = x (W_e + s A_e B_e) + bias_e, projected (T, E r) = x A_e, not differentiable; (T, 0) when no LoRA
    factor needs a gradient).

    The backward computes the input gradient through the merged weights (one matmul), s g_e B_eᵀ per
    expert, the gradient of every A_e as one dense product xᵀ (s g B_eᵀ) and that of every B_e as
    (x A_e)ᵀ g_e; no product of a separate LoRA branch runs in either pass.
    """

    @staticmethod
    def forward(ctx, x, a, w, b, bias, scale, keep_merged):
        _require_frozen(w)
        num_tokens, d = x.shape
        num_experts = a.shape[0]
        width = num_experts * w.shape[2]
        wide = _wide(w, a, b, scale)  # (d, E h)
        out = x @ wide if bias is None else torch.addmm(bias.reshape(width), x, wide)  # (T, E h)
        projected = _every_expert_input(ctx, x, a)  # x A_e: (T, E r)
        # Without keep_merged the backward forms the merged weight again from the parameters (the same numbers)
        ctx.save_for_backward(x, projected, b, *_merged_or_parts(keep_merged, wide, w, a))
        ctx.scale = scale
        return out.view(num_tokens, num_experts, -1), projected

    @staticmethod
    def backward(ctx, grad, _):
        x, projected, b, wide, w, a = ctx.saved_tensors
        if wide is None:
            wide = _wide(w, a, b, ctx.scale)
        num_tokens, num_experts, h = grad.shape
        rank = b.shape[1]
        by_expert = grad.transpose(0, 1)  # (E, T, h), a view
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.reshape(num_tokens, -1) @ wide.T
        if ctx.needs_input_grad[1]:
            rows = narrow_product(by_expert, b.transpose(1, 2)).mul_(ctx.scale)  # s g_e B_eᵀ: (E, T, r)
            rows = rows.transpose(0, 1).reshape(num_tokens, -1)  # (T, E r)
            grad_a = _input_factor_grad(x, rows, rank)
        if ctx.needs_input_grad[3]:
            by_expert_projected = projected.view(num_tokens, num_experts, rank).permute(1, 2, 0)  # (E, r, T)
            grad_b = torch.bmm(by_expert_projected, by_expert).mul_(ctx.scale)
        return grad_x, grad_a, None, grad_b, None, None, None


def _wide(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """Every expert's merged up-projection side by side: (d, E h) from w (E, d, h), a (E, d, r), b (E, r, h)."""
    with torch.no_grad():
        return torch.baddbmm(w, a, b, alpha=scale).permute(1, 0, 2).reshape(w.shape[1], -1)


class DenseDownProjection(torch.autograd.Function):
    """Every expert's down-projection of every token (K = M, or a dense FFN), summed over experts, through
    the merged weights as one wide matmul.

    forward(hidden (T, E, h), w (E, h, d), a (E, h, r), b (E, r, d), scale, keep_merged) -> y (T, d) = sum over e of
    hidden_e (W_e + s A_e B_e).

    Kept for the backward: hidden_e A_e (E, T, r), for B's gradient. The backward computes the hidden
    gradient through the merged weights, s g B_eᵀ for every expert in one dense product, the gradient
    of every A_e as hidden_eᵀ (s g B_eᵀ) and that of every B_e as one dense product.
    """

    @staticmethod
    def forward(ctx, hidden, w, a, b, scale, keep_merged):
        _require_frozen(w)
        num_tokens, num_experts, h = hidden.shape
        merged = torch.baddbmm(w, a, b, alpha=scale).view(num_experts * h, -1)  # (E h, d)
        y = hidden.reshape(num_tokens, -1) @ merged
        low_rank = narrow_product(hidden.transpose(0, 1), a) if ctx.needs_input_grad[3] else None  # (E, T, r)
        # Without keep_merged the backward forms the merged weight again from the parameters (the same numbers)
        ctx.save_for_backward(hidden, low_rank, b, *_merged_or_parts(keep_merged, merged, w, a))
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, grad_y):
        hidden, low_rank, b, merged, w, a = ctx.saved_tensors
        num_tokens, num_experts, h = hidden.shape
        if merged is None:
            with torch.no_grad():
                merged = torch.baddbmm(w, a, b, alpha=ctx.scale).view(num_experts * h, -1)
        rank, d = b.shape[1:]
        grad_hidden = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad_y @ merged.T).view(num_tokens, num_experts, h)
        if ctx.needs_input_grad[2]:
            through_b = _through_b(grad_y, b, ctx.scale)  # s g B_eᵀ: (T, E r)
            by_expert = through_b.view(num_tokens, num_experts, rank).transpose(0, 1)  # (E, T, r)
            grad_a = narrow_product(hidden.permute(1, 2, 0), by_expert)  # (E, h, r)
        if ctx.needs_input_grad[3]:
            rows = low_rank.transpose(1, 2).reshape(num_experts * rank, num_tokens)  # (E r, T)
            grad_b = (rows @ grad_y).mul_(ctx.scale).view(num_experts, rank, d)
        return grad_hidden, None, grad_a, grad_b, None, None
