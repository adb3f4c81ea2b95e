"""The sparse-MoE FFN: exactness against the dense FFN, routing, gradients, padding, errors."""

import pytest
import torch
import torch.nn.functional as F

from ubsmoe.model.fused_gate_up import GroupedGateUpProjection
from ubsmoe.model.grouped_lora import (DenseDownProjection, DenseUpProjection, GroupedDownProjection,
                                       GroupedUpProjection)
from ubsmoe.model.moe_layer import MoEHook, RoutingContext, SlotLayout, SparseMoEFFN
from ubsmoe.model.upcycle import DenseFFN, centroid_router, split_ffn
from ubsmoe.model.expert_observation import ExtraRows

D, H, E = 16, 32, 4


def dense_ffn(gated: bool, seed: int = 0) -> DenseFFN:
    g = torch.Generator().manual_seed(seed)
    w_up, w_down = torch.randn(D, H, generator=g) / D**0.5, torch.randn(H, D, generator=g) / H**0.5
    if gated:
        return DenseFFN(w_up, w_down, F.silu, w_gate=torch.randn(D, H, generator=g) / D**0.5)
    return DenseFFN(w_up, w_down, F.gelu, b_up=torch.randn(H, generator=g) * 0.1, b_down=torch.randn(D, generator=g) * 0.1)


def moe_from(dense: DenseFFN, num_experts: int = E, rank: int = 4, random_b: bool = True, seed: int = 0) -> SparseMoEFFN:
    split = split_ffn(dense, num_experts, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    layer = SparseMoEFFN(split.w_up, split.w_down, dense.activation, w_gate=split.w_gate, b_up=split.b_up,
                         b_down=split.b_down, router_weight=centroid_router(dense, split), lora_rank=rank, generator=g)
    if random_b:
        for name, p in layer.named_parameters():
            if name.startswith("lora_") and name.endswith("_b"):
                p.data.normal_(0, 0.5, generator=g)
    return layer


def reference_forward(layer: SparseMoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition the vectorised layer must match. x: (T, d)."""
    probs = torch.softmax(layer.router(x), -1)
    experts = probs.topk(layer.top_k, -1).indices
    rows = []
    for t in range(x.shape[0]):
        out = layer.b_down.clone() if layer.b_down is not None else x.new_zeros(layer.d_model)
        for e in experts[t].tolist():
            def lin(name, v):
                return v @ getattr(layer, f"w_{name}")[e] + (v @ getattr(layer, f"lora_{name}_a")[e]) @ getattr(layer, f"lora_{name}_b")[e] * layer.lora_scale
            up = lin("up", x[t])
            if layer.b_up is not None:
                up = up + layer.b_up[e]
            hidden = layer.activation(lin("gate", x[t])) * up if layer.w_gate is not None else layer.activation(up)
            gate = probs[t, e] - probs[t, e].detach() + 1.0
            out = out + gate * lin("down", hidden)
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("gated", [False, True])
def test_all_experts_with_unit_gates_equal_the_dense_ffn(gated):
    dense = dense_ffn(gated)
    layer = moe_from(dense, random_b=False)
    layer.set_top_k(E)
    x = torch.randn(1, 10, D, generator=torch.Generator().manual_seed(3))

    y = layer(x)

    torch.testing.assert_close(y[0], dense(x[0]), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_vectorised_layer_matches_token_by_token_reference(gated, k):
    layer = moe_from(dense_ffn(gated)).double()  # float64: differences are then bugs, not rounding
    layer.set_top_k(k)
    x = torch.randn(12, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)

    y = layer(x.unsqueeze(0))[0]
    grads = torch.autograd.grad(y.square().sum(), [x] + [p for p in layer.parameters() if p.requires_grad])
    y_ref = reference_forward(layer, x_ref)
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_ref] + [p for p in layer.parameters() if p.requires_grad])

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("every_expert", [True, False], ids=["every expert", "per slot"])
@pytest.mark.parametrize("keep_merged", [True, False], ids=["merged kept", "merged formed again"])
def test_fused_projections_pass_gradcheck(keep_merged, every_expert):
    g = torch.Generator().manual_seed(0)
    T, S_E, d, h, r = 5, 3, 4, 6, 2
    experts = torch.rand(T, S_E, generator=g).topk(2, -1).indices
    layout = SlotLayout.from_experts(experts, S_E)
    dd = dict(dtype=torch.float64)
    x = torch.randn(T, d, **dd, requires_grad=True)
    w_up, b_up = torch.randn(S_E, d, h, **dd), torch.randn(S_E, h, **dd)
    a_up = torch.randn(S_E, d, r, **dd, requires_grad=True)
    b = torch.randn(S_E, r, h, **dd, requires_grad=True)
    up = lambda x_, a_, b_: GroupedUpProjection.apply(x_, a_, w_up, b_, b_up, 0.5, layout.token, layout.pair,  # noqa: E731
                                                      layout.ends, layout.counts, "up", ExtraRows(), keep_merged,
                                                      every_expert)[0]
    assert torch.autograd.gradcheck(up, (x, a_up, b))
    hidden = torch.randn(layout.token.shape[0], h, **dd, requires_grad=True)
    w_down = torch.randn(S_E, h, d, **dd)
    a = torch.randn(S_E, h, r, **dd, requires_grad=True)
    b_down = torch.randn(S_E, r, d, **dd, requires_grad=True)
    down = lambda h_, a_, b_: GroupedDownProjection.apply(h_, w_down, a_, b_, 0.5, layout.token, layout.pair, T,  # noqa: E731
                                                          layout.ends, layout.counts, ExtraRows(), keep_merged,
                                                          every_expert)
    assert torch.autograd.gradcheck(down, (hidden, a, b_down))


@pytest.mark.parametrize("keep_merged", [True, False], ids=["merged kept", "merged formed again"])
@pytest.mark.parametrize("num_experts", [1, 3], ids=["dense FFN", "every expert on every token"])
def test_dense_projections_pass_gradcheck(num_experts, keep_merged):
    g = torch.Generator().manual_seed(1)
    T, d, h, r = 5, 4, 6, 2
    dd = dict(dtype=torch.float64, generator=g)
    x = torch.randn(T, d, **dd).requires_grad_()
    w_up, b_up = torch.randn(num_experts, d, h, **dd), torch.randn(num_experts, h, **dd)
    a_up, b = (torch.randn(num_experts, *shape, **dd).requires_grad_() for shape in ((d, r), (r, h)))
    up = lambda x_, a_, b_: DenseUpProjection.apply(x_, a_, w_up, b_, b_up, 0.5, keep_merged)[0]  # noqa: E731
    assert torch.autograd.gradcheck(up, (x, a_up, b))
    hidden = torch.randn(T, num_experts, h, **dd).requires_grad_()
    w_down = torch.randn(num_experts, h, d, **dd)
    a, b_down = (torch.randn(num_experts, *shape, **dd).requires_grad_() for shape in ((h, r), (r, d)))
    down = lambda h_, a_, b_: DenseDownProjection.apply(h_, w_down, a_, b_, 0.5, keep_merged)  # noqa: E731
    assert torch.autograd.gradcheck(down, (hidden, a, b_down))


@pytest.mark.parametrize("every_expert", [True, False], ids=["every expert", "per slot"])
@pytest.mark.parametrize("keep_merged", [True, False], ids=["merged kept", "merged formed again"])
@pytest.mark.parametrize("bias", [False, True], ids=["no bias", "up bias"])
def test_fused_gate_and_up_are_the_two_projections_apart(keep_merged, every_expert, bias):
    """One grouped matmul for both gated projections: gradcheck, and the outputs, every-expert products and
    gradients (with a hook's rows on both A factors) of two ``GroupedUpProjection``s."""
    g = torch.Generator().manual_seed(2)
    T, S_E, d, h, r = 5, 3, 4, 6, 2
    layout = SlotLayout.from_experts(torch.rand(T, S_E, generator=g).topk(2, -1).indices, S_E)
    dd = dict(dtype=torch.float64, generator=g)
    x = torch.randn(T, d, **dd).requires_grad_()
    w_gate, w_up = torch.randn(S_E, d, h, **dd), torch.randn(S_E, d, h, **dd)
    b_bias = torch.randn(S_E, h, **dd) if bias else None
    factors = [torch.randn(S_E, *shape, **dd).requires_grad_() for shape in ((d, r), (d, r), (r, h), (r, h))]
    where = (layout.token, layout.pair, layout.ends, layout.counts)

    def fused(x_, a_g, a_u, b_g, b_u, extra=None):
        return GroupedGateUpProjection.apply(x_, a_g, a_u, w_gate, w_up, b_g, b_u, b_bias, 0.5, *where,
                                             extra or ExtraRows(), keep_merged, every_expert)

    assert torch.autograd.gradcheck(lambda *args: fused(*args)[0], (x, *factors))

    def apart(x_, a_g, a_u, b_g, b_u, extra):
        gate, projected_gate = GroupedUpProjection.apply(x_, a_g, w_gate, b_g, None, 0.5, *where, "gate", extra,
                                                         keep_merged, every_expert)
        up, projected_up = GroupedUpProjection.apply(x_, a_u, w_up, b_u, b_bias, 0.5, *where, "up", extra,
                                                     keep_merged, every_expert)
        return torch.cat([gate, up], 1), projected_gate, projected_up

    weights = torch.randn(layout.token.shape[0], 2 * h, **dd)
    results = []
    for run in (fused, apart):
        rows = dict(gate=torch.randn(T, S_E * r, dtype=torch.float64, generator=torch.Generator().manual_seed(3)),
                    up=torch.randn(T, S_E * r, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
        out, *projected = run(x, *factors, ExtraRows(**rows) if every_expert else ExtraRows())
        results.append((out, projected, torch.autograd.grad((out * weights).sum(), [x, *factors])))
    (out, projected, grads), (out_apart, projected_apart, grads_apart) = results
    torch.testing.assert_close(out, out_apart)
    assert [p.shape[1] for p in projected] == [S_E * r if every_expert else 0] * 2
    for got, want in zip([*projected, *grads], [*projected_apart, *grads_apart]):
        torch.testing.assert_close(got, want)


class _SeesProjections(MoEHook):
    """Records which every-expert projections (x A_e for every token and expert) the layer showed it."""

    def __init__(self, reads_every_expert: bool):
        self.reads_every_expert = reads_every_expert
        self.projected: list[str] | None = None

    def observe_experts(self, layer, layout, seen):
        self.projected = sorted(seen.projected)


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "LoRA apart"])
@pytest.mark.parametrize("gated", [False, True], ids=["GELU", "SwiGLU"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_per_slot_lora_products_give_the_every_expert_outputs_and_gradients(gated, k, merged):
    """Without a hook that reads every expert, the model-width LoRA products run over the slots alone; in
    float32 the outputs and gradients are those of the every-expert products within 1e-5."""
    layer = moe_from(dense_ffn(gated))
    layer.merge_limit = layer.merge_limit if merged else 0
    layer.set_top_k(k)
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(5))
    trainable = [p for p in layer.parameters() if p.requires_grad]
    runs = []
    for every_expert in (True, False):
        hook = _SeesProjections(every_expert)
        layer.hooks = [hook]
        x_ = x.clone().requires_grad_(True)
        y = layer(x_)
        runs.append((y, torch.autograd.grad(y.square().sum(), [x_] + trainable), hook.projected))
    (y_every, grads_every, seen_every), (y_slot, grads_slot, seen_slot) = runs

    assert seen_every == (["gate", "up"] if gated else ["up"]) and seen_slot == []
    torch.testing.assert_close(y_slot, y_every, rtol=1e-5, atol=1e-5)
    # within 1e-5 of each tensor's largest entry: the two paths sum float32 products in another order
    for got, want in zip(grads_slot, grads_every):
        assert want.abs().max() > 0
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize("merged", [True, False], ids=["merged", "LoRA apart"])
@pytest.mark.parametrize("gated", [False, True], ids=["GELU", "SwiGLU"])
@pytest.mark.parametrize("k", [2, E], ids=["routed", "every expert"])
def test_active_rank_below_the_rank_is_a_layer_of_that_rank(gated, k, merged):
    """A layer of rank 4 set to its first 2 ranks (HetLoRA's weak clients on a MoE backbone) gives the outputs
    and gradients of a rank-2 layer holding those ranks, within 1e-5, and no gradient to the others."""
    layer, small = moe_from(dense_ffn(gated), rank=4), moe_from(dense_ffn(gated), rank=2)
    with torch.no_grad():
        for name in layer.adapted:
            getattr(small, f"lora_{name}_a").copy_(getattr(layer, f"lora_{name}_a")[:, :, :2])
            getattr(small, f"lora_{name}_b").copy_(getattr(layer, f"lora_{name}_b")[:, :2])
    small.lora_scale = layer.lora_scale  # the scale of the layer's own rank, as set_rank leaves it
    layer.active_rank = 2
    x = torch.randn(2, 12, D, generator=torch.Generator().manual_seed(5))
    runs = []
    for each in (layer, small):
        each.merge_limit = each.merge_limit if merged else 0
        each.set_top_k(k)
        x_ = x.clone().requires_grad_(True)
        y = each(x_)
        factors = [getattr(each, f"lora_{name}_{ab}") for name in each.adapted for ab in "ab"]
        runs.append((y, torch.autograd.grad(y.square().sum(), [x_] + factors)))
    (y, grads), (y_small, grads_small) = runs

    torch.testing.assert_close(y, y_small, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0], grads_small[0], rtol=1e-5, atol=1e-5)
    for i, (got, want) in enumerate(zip(grads[1:], grads_small[1:])):
        first, rest = (got[:, :, :2], got[:, :, 2:]) if i % 2 == 0 else (got[:, :2], got[:, 2:])
        assert want.abs().max() > 0
        assert (first - want).abs().max() <= 1e-5 * want.abs().max()
        assert rest.abs().max() == 0


def test_rows_from_a_hook_that_does_not_read_every_expert_are_refused():
    class AddsRows(MoEHook):
        def observe_experts(self, layer, layout, seen):
            seen.extra_rows.down = torch.zeros(seen.tokens.shape[0], layer.num_experts * layer.lora_rank)

    layer = moe_from(dense_ffn(False))
    layer.set_top_k(2)
    layer.hooks = [AddsRows()]
    with pytest.raises(RuntimeError, match="reads_every_expert"):
        layer(torch.randn(1, 6, D, generator=torch.Generator().manual_seed(6)))


def test_hooks_rows_join_the_model_width_factor_gradients():
    """Rows a hook leaves in ``extra_rows`` add rowsᵀ-products to grad A_up (x^T rows) and grad B_down
    (rows^T g), and the down backward leaves s g B_e^T for every token and expert."""
    g = torch.Generator().manual_seed(1)
    T, S_E, d, h, r = 5, 3, 4, 6, 2
    layout = SlotLayout.from_experts(torch.rand(T, S_E, generator=g).topk(2, -1).indices, S_E)
    dd = dict(dtype=torch.float64)
    x, grad_y = torch.randn(T, d, **dd), torch.randn(T, d, **dd)
    w_up, w_down = torch.randn(S_E, d, h, **dd), torch.randn(S_E, h, d, **dd)
    factors = [torch.randn(shape, **dd, requires_grad=True) for shape in ((S_E, d, r), (S_E, r, h), (S_E, h, r), (S_E, r, d))]
    rows_up, rows_down = torch.randn(T, S_E * r, **dd), torch.randn(T, S_E * r, **dd)

    def grads(extra: ExtraRows) -> list[torch.Tensor]:
        a_up, b_up, a_down, b_down = factors
        up = GroupedUpProjection.apply(x, a_up, w_up, b_up, None, 0.5, layout.token, layout.pair, layout.ends,
                                       layout.counts, "up", extra, True)[0]
        y = GroupedDownProjection.apply(torch.tanh(up), w_down, a_down, b_down, 0.5, layout.token, layout.pair, T,
                                        layout.ends, layout.counts, extra, True)
        return list(torch.autograd.grad(y, factors, grad_y))

    plain, extra = grads(ExtraRows()), ExtraRows(up=rows_up, down=rows_down)
    with_rows = grads(extra)

    torch.testing.assert_close(with_rows[0] - plain[0], (x.T @ rows_up).view(d, S_E, r).permute(1, 0, 2))
    torch.testing.assert_close(with_rows[3] - plain[3], (rows_down.T @ grad_y).view(S_E, r, d))
    torch.testing.assert_close(with_rows[1], plain[1])
    torch.testing.assert_close(with_rows[2], plain[2])
    assert extra.up is None and extra.down is None  # taken once
    torch.testing.assert_close(extra.down_through_b, 0.5 * grad_y @ factors[3].detach().permute(2, 0, 1).reshape(d, -1))


def test_active_experts_get_lora_gradients_and_inactive_experts_none():
    layer = moe_from(dense_ffn(False))
    layer.set_top_k(1)
    x = torch.randn(1, 6, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # steer every token to experts 0 and 2 only
        layer.router.weight.zero_()
        layer.router.bias = None
        layer.router.weight[0] = x[0, :3].mean(0) * 10
        layer.router.weight[2] = -x[0, :3].mean(0) * 10

    layer(x).sum().backward()

    active = set(layer.last_routing.experts.flatten().tolist())
    assert active and active < set(range(E))
    for name in ("lora_up_a", "lora_up_b", "lora_down_a", "lora_down_b"):
        grad = getattr(layer, name).grad
        for e in range(E):
            if e in active:
                assert grad[e].abs().sum() > 0, (name, e)
            else:
                assert torch.count_nonzero(grad[e]) == 0, (name, e)
    assert layer.router.weight.grad.abs().sum() > 0  # straight-through gate: the router learns


def test_straight_through_gate_has_value_one():
    layer = moe_from(dense_ffn(False))
    layer.set_top_k(2)
    layer(torch.randn(1, 5, D))
    assert torch.equal(layer.last_routing.gates, torch.ones(5, 2))


def test_routing_statistics_add_up_and_padding_is_ignored():
    layer = moe_from(dense_ffn(False))
    layer.context = RoutingContext()
    layer.set_top_k(2)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool)
    layer.context.token_mask = mask

    y = layer(x)
    x_other_padding = x.clone()
    x_other_padding[1, 4:] = 100.0
    layer.counter.reset()
    y_other = layer(x_other_padding)

    assert layer.counter.tokens == 11
    assert layer.counter.routed.sum().item() == 2 * 11
    torch.testing.assert_close(layer.counter.prob_sum.sum(), torch.tensor(11.0, dtype=torch.float64))
    torch.testing.assert_close(y[mask], y_other[mask])
    assert torch.equal(y[1, 4:], layer.b_down.expand(3, D))  # padding rows are not computed


@pytest.mark.parametrize("k", [2, E], ids=["routed", "every expert"])
def test_merged_weights_formed_again_in_the_backward_give_the_same_numbers_and_keep_less(k):
    """``keep_merged = False`` (a low-memory client): outputs and gradients bit for bit those of the kept
    merged weights, and fewer bytes kept for the backward."""
    def step(keep: bool):
        layer = moe_from(dense_ffn(True))
        layer.set_top_k(k)
        layer.keep_merged = keep
        x = torch.randn(1, 9, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
        saved = {}

        def pack(t):
            if not isinstance(t, torch.nn.Parameter):
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.pow(2).sum().backward()
        grads = [x.grad] + [p.grad for p in layer.parameters() if p.requires_grad]
        return y.detach(), grads, sum(saved.values())

    y_kept, grads_kept, kept = step(True)
    y_again, grads_again, again = step(False)
    assert torch.equal(y_kept, y_again)
    assert len(grads_kept) == len(grads_again) and all(torch.equal(a, b) for a, b in zip(grads_kept, grads_again))
    assert again < kept


@pytest.mark.parametrize("k", [2, E], ids=["routed", "every expert"])
def test_kept_merged_weights_are_all_a_bf16_layer_keeps_of_its_expert_matrices(k):
    """With the merged weights kept (the default), the backward keeps no float32 copy of a bf16 layer's
    frozen expert matrices beside them."""
    layer = moe_from(dense_ffn(True))
    with torch.no_grad():
        for name in ("w_up", "w_gate", "w_down"):
            getattr(layer, name).data = getattr(layer, name).data.to(torch.bfloat16)
    layer.set_top_k(k)
    frozen_shapes = {tuple(getattr(layer, name).shape) for name in ("w_up", "w_gate", "w_down")}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(1, 9, D, generator=torch.Generator().manual_seed(3)))
    assert frozen_shapes and not [tuple(t.shape) for t in saved if tuple(t.shape) in frozen_shapes]


def test_padding_scatter_keeps_no_output_for_the_backward():
    """Scattering the real tokens' outputs back among the padding keeps only their index for the backward,
    not the (T, d) outputs, and the padding rows get no gradient."""
    layer = moe_from(dense_ffn(True))
    layer.context = RoutingContext(token_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool))
    layer.set_top_k(2)
    x = torch.randn(2, 7, D, generator=torch.Generator().manual_seed(6), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    kinds = {type(t.grad_fn).__name__ for t in saved if t.grad_fn is not None}
    assert not any("DownProjection" in kind for kind in kinds), kinds
    y.sum().backward()
    assert torch.equal(x.grad[1, 4:], torch.zeros(3, D)) and x.grad[:, :4].abs().sum() > 0


@pytest.mark.parametrize("bad", [0, -1, E + 1, 2.0])
def test_top_k_outside_range_is_refused(bad):
    layer = moe_from(dense_ffn(False))
    with pytest.raises(ValueError, match=rf"top-K must be an integer in \[1, {E}\]"):
        layer.set_top_k(bad)


def test_compute_is_grouped_by_expert_with_one_sort():
    experts = torch.tensor([[2, 0], [1, 2], [0, 1]])
    layout = SlotLayout.from_experts(experts, 4)
    assert layout.counts == [2, 2, 2, 0]
    assert layout.expert.tolist() == [0, 0, 1, 1, 2, 2]
    assert layout.token.tolist() == [0, 2, 1, 2, 0, 1]
    assert layout.ends.tolist() == [2, 4, 6, 6]


@pytest.mark.parametrize("rank,hidden", [(1, 32), (2, 32), (3, 32), (8, 32), (2, 24)])
def test_float32_grouped_path_matches_float64_for_unaligned_ranks_and_widths(rank, hidden):
    # Grouped-matmul kernels need 16-byte rows: ranks and expert widths that break that must still work.
    g = torch.Generator().manual_seed(rank)
    dense = DenseFFN(torch.randn(D, hidden, generator=g) / D**0.5, torch.randn(hidden, D, generator=g) / hidden**0.5,
                     F.gelu, b_up=torch.randn(hidden, generator=g) * 0.1, b_down=torch.randn(D, generator=g) * 0.1)
    layer = moe_from(dense, rank=rank)
    layer.set_top_k(2)
    reference = moe_from(dense, rank=rank).double()
    reference.set_top_k(2)
    x = torch.randn(1, 20, D, generator=g)

    y = layer(x)
    y.square().sum().backward()
    y_ref = reference(x.double())
    y_ref.square().sum().backward()

    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_down_a.grad.double(), reference.lora_down_a.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(layer.lora_up_b.grad.double(), reference.lora_up_b.grad, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("gate_mode", ["straight_through", "softmax", "softmax_renorm"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k", [1, 2, E])
def test_few_tokens_without_gradients_run_unmerged_with_the_same_output(gated, k, gate_mode, monkeypatch):
    """A decoding step's few tokens skip the merged weights W + s A B (merging would cost more than
    their LoRA products); the output is the merged path's to float precision."""
    layer = moe_from(dense_ffn(gated)).double()
    layer.gate_mode = gate_mode
    layer.set_top_k(k)
    x = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    merged = layer(x).detach()  # gradients enabled: the merged path

    monkeypatch.setattr(SparseMoEFFN, "_routed_experts", lambda *a: pytest.fail("took the merged routed path"))
    monkeypatch.setattr(DenseUpProjection, "apply", lambda *a: pytest.fail("took the merged dense path"))
    with torch.no_grad():
        unmerged = layer(x)
        large_batch_merges = layer._merge_pays(100_000)

    torch.testing.assert_close(unmerged, merged, rtol=1e-12, atol=1e-12)
    assert large_batch_merges and layer._merge_pays(1)  # with gradients the merged path, always
