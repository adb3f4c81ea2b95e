"""Experts too large to merge (E d h above ``MERGE_LIMIT``) train with the LoRA apart: the same outputs and
gradients as the merged path (gated and ungated, with biases), the same run under every sparse method's
hooks (UB-SMoE's pseudo-gradient rows included), and no (E, d, h) tensor kept for the backward."""

import pytest
import torch
import torch.nn.functional as F

import ubsmoe.model.moe_layer as moe_layer
from tiny_experiment import tiny_overrides
from ubsmoe.config import load_config
from ubsmoe.data.dataset import Batch
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.model.moe_layer import SparseMoEFFN


def layer(gated: bool, bias: bool, generator: torch.Generator, experts: int = 6, d: int = 16, h: int = 24):
    moe = SparseMoEFFN(torch.randn(experts, d, h, generator=generator) * 0.3,
                       torch.randn(experts, h, d, generator=generator) * 0.3, F.silu,
                       w_gate=torch.randn(experts, d, h, generator=generator) * 0.3 if gated else None,
                       b_up=torch.randn(experts, h, generator=generator) * 0.1 if bias else None,
                       b_down=torch.randn(d, generator=generator) * 0.1 if bias else None,
                       router_weight=torch.randn(experts, d, generator=generator), lora_rank=4, generator=generator)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name.startswith("lora_") and name.endswith("_b"):
                p.normal_(0, 0.2, generator=generator)
    moe.set_top_k(2)
    return moe


@pytest.mark.parametrize("gated, bias, top_k", [(True, False, 2), (False, True, 2), (True, False, 6)])
def test_the_unmerged_path_gives_the_merged_outputs_and_gradients(gated, bias, top_k):
    """K = M (6 of 6) takes the every-expert path: the router's gradient too (straight-through gates)."""
    generator = torch.Generator().manual_seed(0)
    moe = layer(gated, bias, generator)
    moe.set_top_k(top_k)
    x = torch.randn(2, 9, 16, generator=generator, requires_grad=True)
    weights = torch.linspace(-1, 1, 2 * 9 * 16).view(2, 9, 16)
    runs = []
    for limit in (2**30, 0):  # everything merges; nothing merges
        moe.merge_limit = limit
        moe.zero_grad()
        x.grad = None
        y = moe(x)
        (y * weights).sum().backward()
        runs.append((y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in moe.named_parameters()
                                                    if p.grad is not None}))
    (y_merged, gx_merged, g_merged), (y_apart, gx_apart, g_apart) = runs
    torch.testing.assert_close(y_apart, y_merged, atol=1e-5, rtol=1e-5)
    # rtol as for the weights' gradients below: the two paths sum the experts' float32 input gradients in
    # another order (one element of 288 differed by 4.7e-5 relative, 1.4e-5 absolute, at K = M gated)
    torch.testing.assert_close(gx_apart, gx_merged, atol=1e-5, rtol=1e-4)
    assert set(g_apart) == set(g_merged) and any(n.startswith("lora_") for n in g_apart)
    assert "router.weight" in g_apart
    for name in g_merged:
        torch.testing.assert_close(g_apart[name], g_merged[name], atol=1e-5, rtol=1e-4)


def test_no_expert_sized_tensor_is_kept_for_the_backward():
    """The merged path keeps W + s A B (E, d, h) per matrix for its backward; the unmerged one keeps only
    references to the frozen weights themselves and tensors that grow with the slots."""
    generator = torch.Generator().manual_seed(1)
    moe = layer(True, False, generator, experts=16, d=32, h=64)
    x = torch.randn(1, 8, 32, generator=generator, requires_grad=True)
    frozen = {moe.w_up.untyped_storage().data_ptr(), moe.w_gate.untyped_storage().data_ptr(),
              moe.w_down.untyped_storage().data_ptr()}
    expert_sized = 16 * 32 * 64
    new_expert_sized = {}
    for limit in (2**30, 0):
        moe.merge_limit = limit
        kept = []

        def pack(t):
            if t.numel() >= expert_sized and t.untyped_storage().data_ptr() not in frozen:
                kept.append(tuple(t.shape))
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            moe(x).sum().backward()
        new_expert_sized[limit] = kept
    # merged: gate and up side by side (E, d + padding + 2r, 2h), and down
    assert sorted(new_expert_sized[2**30]) == [(16, 48, 128), (16, 64, 48)]
    assert new_expert_sized[0] == []


@pytest.mark.parametrize("method", ["ubsmoe", "smoe-bias", "a3smoe", "default-moe"])
def test_every_sparse_methods_gradients_are_the_merged_ones(tiny_bert, tiny_task, method):
    """One client's gradients with the method's hooks (UB-SMoE: DMR and the pseudo-gradient's rows) on
    non-zero adapters. Over whole runs the two paths drift apart by rounding only, which Adam amplifies on
    near-zero gradients: compared here where that does not hide a wrong term."""
    exp = build_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method=method))
    model, method_ = exp.model, exp.method
    model.load_trainable_state(method_.initial_state(model).params)
    method_.setup_client(model, method_.tier_settings(0.5))
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora" in name and p.requires_grad:
                p.normal_(0, 0.05, generator=generator)
    batch = Batch(*next(iter(exp.train.batches(8))))
    snapshot = model.trainable_state()  # with the shared buffers a hook updates in its forward (default-moe)
    grads = []
    for limit in (2**30, 0):
        model.load_trainable_state(snapshot)
        for moe in model.moe_layers:
            moe.merge_limit = limit
        model.zero_grad()
        loss, extra = exp.task.loss(model, batch), method_.local_loss(model)
        (loss if extra is None else loss + extra).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    merged, apart = grads
    assert set(apart) == set(merged) and any("lora_up_a" in n for n in merged)
    for name, grad in merged.items():
        assert (apart[name] - grad).norm() <= 1e-4 * grad.norm() + 1e-12, name  # rounding only


def test_a_run_with_unmerged_experts_trains_and_counts_its_own_products(tiny_bert, tiny_task, monkeypatch):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method="ubsmoe")
    merged = run_experiment(config, show_progress=False)
    monkeypatch.setattr(moe_layer, "MERGE_LIMIT", 0)
    apart = run_experiment(config, show_progress=False)

    assert apart.final.test_loss == pytest.approx(merged.final.test_loss, abs=2e-3)
    cost = lambda r: r.history[-1].cost.clients[0].train_flops  # noqa: E731
    assert cost(apart) != cost(merged)  # the FLOP counter follows the path
