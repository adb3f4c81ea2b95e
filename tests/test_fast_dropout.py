"""The CPU-cheap dropout: its drop rate, its scaling and gradient, and attention with dropout against
an explicit float64 computation with the same mask; the backbone keeps its outputs and its padding."""

import math

import pytest
import torch
from torch import nn

from ubsmoe.model import fast_dropout
from ubsmoe.model.pretrained import load_dense_backbone


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_drops_at_the_quantised_rate(p):
    n = 1 << 21
    mask = fast_dropout.keep_mask((n,), p, torch.Generator().manual_seed(0))

    drop_rate = 1.0 - mask.double().mean().item()

    expected = round(p * 65536) / 65536
    assert abs(drop_rate - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_keep_mask_follows_the_generator():
    first = fast_dropout.keep_mask((64, 33), 0.3, torch.Generator().manual_seed(5))
    again = fast_dropout.keep_mask((64, 33), 0.3, torch.Generator().manual_seed(5))
    other = fast_dropout.keep_mask((64, 33), 0.3, torch.Generator().manual_seed(6))

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert fast_dropout.keep_mask((10, 7), 0.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scaled_keep_mask_is_the_keep_mask_times_the_dropout_scale(dtype):
    keep = fast_dropout.keep_mask((40, 30), 0.3, torch.Generator().manual_seed(2))
    factor = fast_dropout.scaled_keep_mask((40, 30), 0.3, dtype, torch.Generator().manual_seed(2))

    assert factor.dtype == dtype and factor.shape == (40, 30)
    assert torch.equal(factor, torch.where(keep, torch.tensor(1 / 0.7, dtype=dtype), torch.tensor(0, dtype=dtype)))


def test_dropout_scales_kept_values_and_masks_the_gradient():
    x = torch.randn(37, 19, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    keep = fast_dropout.keep_mask(x.shape, 0.25)

    torch.manual_seed(3)
    y = fast_dropout.dropout(x, 0.25)
    y.backward(torch.ones_like(y))

    assert 0 < keep.sum() < keep.numel()
    torch.testing.assert_close(y, torch.where(keep, x * (1 / 0.75), 0.0), rtol=0, atol=0)
    torch.testing.assert_close(x.grad, keep.double() * (1 / 0.75), rtol=0, atol=0)


def test_dropout_off_in_evaluation_and_at_the_ends():
    x = torch.randn(5, 6)

    assert fast_dropout.dropout(x, 0.4, training=False) is x
    assert fast_dropout.dropout(x, 0.0) is x
    assert torch.equal(fast_dropout.dropout(x, 1.0), torch.zeros_like(x))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        fast_dropout.dropout(x, 1.5)


class _Attention(nn.Module):
    def __init__(self, is_causal: bool, kv_groups: int):
        super().__init__()
        self.is_causal, self.num_key_value_groups = is_causal, kv_groups


def _reference(query, key, value, allowed, keep, p):
    """float64 attention with an explicit keep mask; allowed: (B or 1, 1, Lq, Lk) bool."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(2, 3) / math.sqrt(query.shape[-1])
    probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1)
    return (torch.where(keep, probs, 0.0) / (1 - p) @ value).transpose(1, 2)


@pytest.mark.parametrize("chunk_bytes", [1, fast_dropout.CHUNK_BYTES], ids=["one sequence a chunk", "one chunk"])
@pytest.mark.parametrize("case", ["padded encoder", "causal decoder with grouped keys"])
def test_attention_with_dropout_matches_the_explicit_computation(case, chunk_bytes, monkeypatch):
    monkeypatch.setattr(fast_dropout, "CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    batch, heads, length, dim = 3, 4, 9, 8
    kv_heads = 4 if case == "padded encoder" else 2
    query = torch.randn(batch, heads, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    key = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    value = torch.randn(batch, kv_heads, length, dim, generator=g, dtype=torch.float64, requires_grad=True)
    if case == "padded encoder":
        module, mask = _Attention(False, 1), torch.ones(batch, 1, length, length, dtype=torch.bool)
        mask[1, :, :, 6:] = False  # the second sequence has three padding positions
        allowed = mask
    else:
        module, mask = _Attention(True, 2), None
        allowed = torch.ones(length, length, dtype=torch.bool).tril().view(1, 1, length, length)
    p = 0.3
    torch.manual_seed(11)
    keep = fast_dropout.keep_mask((batch, heads, length, length), p)

    torch.manual_seed(11)
    out, _ = fast_dropout.attention_forward(module, query, key, value, mask, dropout=p, scaling=dim ** -0.5)
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    expected = _reference(query, key, value, allowed, keep, p)
    expected_grads = torch.autograd.grad(expected.square().sum(), (query, key, value))

    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_attention_with_an_additive_mask_and_a_frozen_key(monkeypatch):
    # Chunks of two sequences over a batch of three; the key needs no gradient (as in a first layer).
    monkeypatch.setattr(fast_dropout, "CHUNK_BYTES", 2 * 4 * 6 * 6 * 8)
    g = torch.Generator().manual_seed(3)
    query, value = (torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    key = torch.randn(3, 4, 6, 5, generator=g, dtype=torch.float64)
    allowed = torch.ones(3, 1, 6, 6, dtype=torch.bool)
    allowed[2, :, :, 4:] = False
    additive = torch.zeros(3, 1, 6, 6, dtype=torch.float64).masked_fill(~allowed, torch.finfo(torch.float64).min)
    torch.manual_seed(4)
    keep = fast_dropout.keep_mask((3, 4, 6, 6), 0.2)

    torch.manual_seed(4)
    out, _ = fast_dropout.attention_forward(_Attention(False, 1), query, key, value, additive, dropout=0.2)
    grads = torch.autograd.grad(out.sum(), (query, value))
    expected = _reference(query, key, value, allowed, keep, 0.2)
    expected_grads = torch.autograd.grad(expected.sum(), (query, value))

    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)


def test_bool_and_additive_masks_give_the_same_bits():
    # A bool mask is turned into an additive one; s + finfo.min rounds to finfo.min, as a fill would.
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(3, 2, 6, 4, generator=g) * 10 for _ in range(3))
    allowed = torch.ones(3, 1, 6, 6, dtype=torch.bool)
    allowed[0, :, :, 3:] = False
    allowed[2, :, :, 5:] = False
    additive = torch.zeros(3, 1, 6, 6).masked_fill(~allowed, torch.finfo(torch.float32).min)
    outputs = []
    for mask in (allowed, additive):
        torch.manual_seed(9)
        outputs.append(fast_dropout.attention_forward(_Attention(False, 1), q, k, v, mask, dropout=0.2)[0])

    assert torch.equal(outputs[0], outputs[1])
    torch.manual_seed(9)
    keep = fast_dropout.keep_mask((3, 2, 6, 6), 0.2)
    expected = _reference(q.double(), k.double(), v.double(), allowed, keep, 0.2)
    torch.testing.assert_close(outputs[0].double(), expected, rtol=1e-5, atol=1e-5)


def test_attention_dropping_everything_gives_zeros_not_nans():
    q, k, v = (torch.randn(2, 3, 5, 4, requires_grad=True) for _ in range(3))

    out, _ = fast_dropout.attention_forward(_Attention(False, 1), q, k, v, None, dropout=1.0)
    out.sum().backward()

    assert torch.equal(out, torch.zeros_like(out))
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in (q, k, v))


def test_attention_without_dropout_is_huggingface_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 7, 8, generator=g) for _ in range(3))
    module = _Attention(True, 1)

    out, _ = fast_dropout.attention_forward(module, q, k, v, None, dropout=0.0, scaling=0.3)
    expected, _ = sdpa_attention_forward(module, q, k, v, None, dropout=0.0, scaling=0.3)

    assert torch.equal(out, expected)


@pytest.mark.parametrize("checkpoint", ["tiny_bert", "tiny_llama"])
def test_backbone_keeps_its_outputs_and_padding(checkpoint, request):
    from transformers import AutoModel

    path = request.getfixturevalue(checkpoint)
    model, _ = load_dense_backbone(str(path))
    original = AutoModel.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    model.eval()
    ids = torch.randint(5, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0

    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = original(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model(input_ids=ids[1:, :7], attention_mask=mask[1:, :7]).last_hidden_state

    assert model.config._attn_implementation == fast_dropout.ATTENTION_IMPLEMENTATION
    assert not any(type(m) is nn.Dropout for m in model.modules())
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out[1, :7], alone[0])  # padding changes nothing for the real tokens


def test_backbone_training_forward_is_seeded(tiny_bert):
    model, _ = load_dense_backbone(str(tiny_bert))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.1  # the tiny checkpoint has none
    model.train()
    ids = torch.randint(5, 30, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)

    outputs = []
    for seed in (4, 4, 5):
        torch.manual_seed(seed)
        outputs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state)

    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])
