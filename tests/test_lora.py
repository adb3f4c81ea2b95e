"""LoRALinear: the frozen layer plus (alpha / r) x A B, its gradients, and the truncated ranks."""

import pytest
import torch
from torch import nn

from ubsmoe.model.lora import LoRALinear


def adapter(bias: bool, rank: int = 4) -> LoRALinear:
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(6, 5, bias=bias).double()
    layer = LoRALinear(base, rank, alpha=8.0, generator=g).double()
    with torch.no_grad():
        layer.lora_b.normal_(generator=g)
    return layer


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("active_rank", [4, 2])
def test_output_and_gradients_match_the_explicit_formula(bias, active_rank):
    layer = adapter(bias)
    layer.active_rank = active_rank
    x = torch.randn(3, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    a, b = layer.lora_a[:, :active_rank], layer.lora_b[:active_rank]

    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), (x, layer.lora_a, layer.lora_b))
    expected = layer.base(x) + (8.0 / 4) * x @ a @ b  # the scale is alpha / allocated rank
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, layer.lora_a, layer.lora_b))

    assert out.shape == (3, 7, 5)
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want)
    assert grads[1][:, active_rank:].abs().sum() == 0  # ranks beyond the active ones get no gradient
    assert all(not p.requires_grad for p in layer.base.parameters())


def test_a_fresh_adapter_leaves_the_layer_unchanged():
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, 4, alpha=16.0)
    x = torch.randn(2, 6)

    assert torch.equal(layer(x), base(x))


def test_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        LoRALinear(nn.Linear(3, 3), 0, alpha=1.0)


def test_an_unfrozen_base_layer_is_refused():
    layer = adapter(bias=True)
    layer.base.weight.requires_grad_(True)

    with pytest.raises(ValueError, match="keep base.weight and base.bias frozen"):
        layer(torch.randn(2, 6, dtype=torch.float64))


@pytest.mark.parametrize("columns", [3, 8, 16, 40])
def test_narrow_products_equal_the_direct_ones_and_pass_gradcheck(columns):
    from ubsmoe.model.matmul import NarrowLinear, narrow_product

    g = torch.Generator().manual_seed(columns)
    x = torch.randn(2, 9, 6, dtype=torch.float64, generator=g)
    w = torch.randn(2, 6, columns, dtype=torch.float64, generator=g)
    torch.testing.assert_close(narrow_product(x, w), x @ w, rtol=1e-12, atol=1e-12)
    weight = torch.randn(columns, 6, dtype=torch.float64, generator=g, requires_grad=True)
    inputs = x[0].clone().requires_grad_()
    assert NarrowLinear.apply(inputs, weight).is_contiguous()
    assert torch.autograd.gradcheck(NarrowLinear.apply, (inputs, weight))
