"""Dropout that costs little on a CPU, for the backbone's hidden states and attention probabilities.

PyTorch's CPU dropout draws one Bernoulli sample per element (about 7 ns each on this project's
machines), and attention dropout pushes ``scaled_dot_product_attention`` off its fused kernel onto
the unfused one. Together that is a quarter of a low-tier training step of the default model, a cost
that does not shrink with K. Here a keep-mask is read from 16 random bits per element, drawn 64 at a
time from a numpy SFC64 generator seeded from torch's (so ``torch.manual_seed`` fixes every mask), and
attention with dropout runs a few sequences at a time (``_DroppedAttention``): each chunk's scores,
softmax, dropout and product with the values stay in cache, in buffers reused from chunk to chunk.
Without dropout (evaluation, or p = 0) attention stays on Hugging Face's own SDPA path.

The drop probability is ``round(p * 65536) / 65536`` (p = 0.1 drops with probability 0.100006). Kept
values are scaled by 1 / (1 - p) as in ``torch.nn.Dropout``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

ATTENTION_IMPLEMENTATION = "ubsmoe_sdpa"
_RESOLUTION = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool tensor of ``shape``, each element False with probability round(p * 2^16) / 2^16.

    The bits come from numpy's SFC64 seeded by one draw from ``generator`` (torch's default one if None):
    twice as fast as torch's Mersenne Twister, and as reproducible under ``torch.manual_seed``.
    """
    return torch.from_numpy(_keep_array(math.prod(shape), p, generator)).view(shape)


def scaled_keep_mask(shape: torch.Size | tuple[int, ...], p: float, dtype: torch.dtype,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """keep / (1 - p) as a ``dtype`` tensor of ``shape``, from the same draws as ``keep_mask``: the factor
    dropout multiplies by. A float product is vectorised where ``torch.where`` on a bool mask is not (nine
    times faster on this project's machines), and the value 1 / (1 - p) rounded to ``dtype`` is the one
    ``torch.nn.Dropout`` scales by."""
    keep = _keep_array(math.prod(shape), p, generator)
    scale = 1.0 / (1.0 - p)
    if dtype in _NUMPY_FLOATS:  # numpy converts and scales about twice as fast as torch
        factor = keep.astype(_NUMPY_FLOATS[dtype])
        factor *= scale  # the scale is rounded to the array's dtype first, as torch does with a Python scalar
        return torch.from_numpy(factor).view(shape)
    return torch.from_numpy(keep).to(dtype).mul_(scale).view(shape)


_NUMPY_FLOATS = {torch.float32: np.float32, torch.float64: np.float64}


def _keep_array(n: int, p: float, generator: torch.Generator | None) -> np.ndarray:
    """(n,) bool: True with probability 1 - round(p * 2^16) / 2^16, one 16-bit draw per element."""
    seed = int(torch.randint(1 << 62, (1,), generator=generator))
    words = np.random.SFC64(seed).random_raw(-(-n // 4))  # (ceil(n / 4),) uint64
    bits = words.view(np.int16)[:n]  # uniform on [-2^15, 2^15)
    # numpy's int16 comparison is vectorised; torch's ran 5 times slower on this project's machines
    return np.greater_equal(bits, round(p * _RESOLUTION) - (_RESOLUTION >> 1))


class _Dropout(torch.autograd.Function):
    """x * (keep / (1 - p)); the backward multiplies by the same factor (saved, one element per element)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        factor = scaled_keep_mask(x.shape, p, x.dtype)
        ctx.save_for_backward(factor)
        return x * factor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (factor,) = ctx.saved_tensors
        return grad * factor, None


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Drop each element of ``x`` with probability p (training only) and scale the rest by 1 / (1 - p)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    if x.device.type != "cpu":  # the fused GPU kernels are fast already
        return nn.functional.dropout(x, p, training=True)
    return _Dropout.apply(x, p)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the cheap keep-mask; a drop-in replacement (same ``p``, same scaling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """A Hugging Face attention function: query (B, H, Lq, dh), key and value (B, H_kv, Lk, dh) ->
    ((B, Lq, H, dh), None). Without dropout it is Hugging Face's SDPA; with dropout it is
    ``_DroppedAttention`` with a ``keep_mask`` over the probabilities."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    if dropout == 0.0 or query.device.type != "cpu" or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    q_len, k_len = query.shape[2], key.shape[2]
    is_causal = kwargs.get("is_causal")
    is_causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    if attention_mask is None and is_causal and q_len > 1:
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    return _DroppedAttention.apply(query, key, value, attention_mask, dropout, scaling), None


CHUNK_BYTES = 3 << 19
"""Size of one chunk's (sequences, H, Lq, Lk) score block: 1.5 MiB stays within the L2 caches of two cores."""


class _DroppedAttention(torch.autograd.Function):
    """dropout(softmax(q kᵀ * scaling + mask)) v, a chunk of sequences at a time.

    forward(query (B, H, Lq, dh), key and value (B, H, Lk, dh), mask, p, scaling) -> (B, Lq, H, dh).
    mask: None, bool (True where attending is allowed) or additive float, broadcastable to (B, H, Lq, Lk).
    The keep-mask is drawn for the whole batch at once (the same draws as an unchunked pass). Saved for
    the backward: the probabilities and the keep-mask (1 byte per element); the kept probabilities
    are recomputed chunk by chunk rather than stored. The 1 / (1 - p) scale multiplies the (B, Lq, H,
    dh) output and incoming gradient instead of the (B, H, Lq, Lk) probabilities.
    """

    @staticmethod
    def forward(ctx, query, key, value, mask, p, scaling):
        batch, heads, q_len, dim = query.shape
        k_len = key.shape[2]
        keep = keep_mask((batch, heads, q_len, k_len), p).view(torch.uint8)
        scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
        chunk = _chunk_sequences(query, k_len)
        if mask is not None:
            mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
            if mask.dtype == torch.bool:  # an additive mask: adding is 8 times faster than masked_fill_
                # s + finfo.min rounds to finfo.min for any score below 1e31: the same values as a fill
                mask = torch.zeros(mask.shape, dtype=query.dtype).masked_fill_(~mask, torch.finfo(query.dtype).min)
        scaled_query = query * scaling
        probs = query.new_empty(batch, heads, q_len, k_len)
        out = query.new_empty(batch, q_len, heads, dim)
        scores, chunk_out = query.new_empty(chunk, heads, q_len, k_len), query.new_empty(chunk, heads, q_len, dim)
        for start in range(0, batch, chunk):
            rows = slice(start, min(batch, start + chunk))
            n = rows.stop - rows.start
            s = torch.matmul(scaled_query[rows], key[rows].transpose(2, 3), out=scores[:n])
            if mask is not None:
                s.add_(mask[rows] if mask.shape[0] > 1 else mask)
            torch.ops.aten._softmax.out(s, -1, False, out=probs[rows])
            kept = torch.mul(probs[rows], keep[rows], out=s)
            torch.mul(torch.matmul(kept, value[rows], out=chunk_out[:n]).transpose(1, 2), scale, out=out[rows])
        ctx.save_for_backward(query, key, value, probs, keep)
        ctx.scale, ctx.scaling, ctx.chunk = scale, scaling, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, probs, keep = ctx.saved_tensors
        batch, heads, q_len, dim = query.shape
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        grad_q = torch.empty_like(query) if need_q else None
        grad_k = torch.empty_like(key) if need_k else None
        grad_v = torch.empty_like(value) if need_v else None
        chunk = ctx.chunk
        block, grad_scores = (query.new_empty(chunk, heads, q_len, key.shape[2]) for _ in range(2))
        grad_chunk = query.new_empty(chunk, heads, q_len, dim)
        for start in range(0, batch, chunk):
            rows = slice(start, min(batch, start + chunk))
            n = rows.stop - rows.start
            g = torch.mul(grad[rows].transpose(1, 2), ctx.scale, out=grad_chunk[:n])  # (n, H, Lq, dh)
            if need_v:
                kept = torch.mul(probs[rows], keep[rows], out=block[:n])
                torch.matmul(kept.transpose(2, 3), g, out=grad_v[rows])
            if need_q or need_k:
                grad_kept = torch.matmul(g, value[rows].transpose(2, 3), out=block[:n]).mul_(keep[rows])
                gs = torch.ops.aten._softmax_backward_data.out(grad_kept, probs[rows], -1, probs.dtype,
                                                                grad_input=grad_scores[:n])
                if need_q:
                    torch.matmul(gs, key[rows], out=grad_q[rows])
                if need_k:
                    torch.matmul(gs.transpose(2, 3), query[rows], out=grad_k[rows])
        for g in (grad_q, grad_k):
            if g is not None:
                g.mul_(ctx.scaling)
        return grad_q, grad_k, grad_v, None, None, None


def _chunk_sequences(query: torch.Tensor, k_len: int) -> int:
    """How many sequences one chunk takes: as many as fit ``CHUNK_BYTES`` of scores, at least one."""
    per_sequence = query.shape[1] * query.shape[2] * k_len * query.element_size()
    return max(1, min(query.shape[0], CHUNK_BYTES // per_sequence))


def install(model: nn.Module) -> None:
    """Swap every ``nn.Dropout`` of a Hugging Face model for ``FastDropout`` and route its attention
    through ``attention_forward`` (masks built as for SDPA)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_IMPLEMENTATION, attention_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, FastDropout(child.p, child.inplace))
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)
