"""Cost accounting: the FLOP counter against a hand count, payload bytes, the run's cost records."""

import pytest
import torch

from tiny_experiment import tiny_overrides
from tiny_checkpoints import write_tiny_bert, write_tiny_llama
from ubsmoe.config import load_config
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.model import ModelSpec, build_model
from ubsmoe.model.moe_layer import MoEHook
from ubsmoe.tasks.classification import classification_head


@pytest.fixture(scope="module")
def one_layer_model(tmp_path_factory):
    folder = write_tiny_bert(tmp_path_factory.mktemp("one-layer"), hidden=32, layers=1, ffn=64)
    return build_model(ModelSpec(backbone=str(folder), num_experts=4, lora_rank=4, router_init="centroid"),
                       classification_head(3))


# d = 32, FFN 64 split into E = 4 experts of width 16, LoRA r = 4, 4 heads x 8 = 32 attention width.
# Batch of B = 2 sequences padded to S = 5 with 7 real tokens: P = 10 positions.
#   attention projections (query, key, value, output; frozen): 2 * 10 * 4 * 32 * 32      = 81,920
#   scores and values: 2 * 2 * B * S^2 * 32                                              =  6,400
#   LoRA on query and value: 2 * 2 * 10 * 4 * (32 + 32)                                  = 10,240
#   experts (up and down, frozen) per slot: 2 * 2 * 32 * 16 = 2,048; slots = 7 K
#   K < M, training: the experts' merged weights W + s A B, once per batch: 2 * 2 * 4 * 32 * 16 * 4 = 32,768
#   router: 2 * 7 * 32 * 4                                                               =  1,792
#   head on the 2 pooled vectors: 2 * 2 * 32 * 3                                         =    384
# Inference: 7 K slots are fewer than E d h / (d + h) = 42.7, so the layer skips the merge and runs
# s (x A_e) B_e per slot, 2 * 2 * (32 + 16) * 4 = 768 per slot: 100,736 + 7 K * (2,048 + 768). Training: frozen matrices x 2 (forward + input gradient),
# trainable ones and attention scores x 3 (forward + input and weight gradients), except that the
# block reads the frozen embeddings: query, key and value need no input gradient (-61,440), nor do
# the LoRA factors A of query and value (-5,120). The expert LoRA adds, per matrix, two products per slot
# for its model-width factor, 2 * 2 * 4 * 32 * 2 = 1,024 per slot, and two per slot for the other,
# 2 * 2 * 4 * 16 * 2 = 512 per slot:
#   163,840 + 19,200 + 30,720 + 32,768 + 5,376 + 1,152 - 66,560 = 186,496, plus 7 K (4,096 + 512 + 1,024).
# When a hook reads every expert (the pseudo-gradient), the model-width factor's two products run over all
# E experts and 7 tokens instead, 2 * 2 * 7 * 4 * 4 * 32 * 2 = 28,672: 215,168 plus 7 K (4,096 + 512).
class _ReadsEveryExpert(MoEHook):
    reads_every_expert = True


@pytest.mark.parametrize("k,every_expert,inference,training", [
    (1, False, 120_448, 225_920), (2, False, 140_160, 265_344), (1, True, 120_448, 247_424), (2, True, 140_160, 279_680)])
def test_flop_counter_matches_a_hand_count(one_layer_model, k, every_expert, inference, training):
    model = one_layer_model
    model.set_top_k(k)
    layer = model.moe_layers[0]
    layer.hooks = [_ReadsEveryExpert()] if every_expert else []
    try:
        counter = FlopCounter(model)
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
        ids = torch.randint(5, 20, mask.shape)
        model(ids, mask)

        assert counter.count(mask, training=False).total == inference
        assert counter.count(mask, training=True).total == training
    finally:
        layer.hooks = []


def test_flop_counter_takes_its_hooks_off(one_layer_model):
    model = one_layer_model
    hooks = lambda: sum(len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    before = hooks()
    with FlopCounter(model) as counter:
        assert hooks() == before + len(counter.frozen_linears) + len(counter.lora_modules) > before
    assert hooks() == before


def test_flop_counter_follows_the_active_lora_rank(one_layer_model):
    model = one_layer_model
    model.set_top_k(1)
    mask = torch.ones(1, 4, dtype=torch.long)
    counter = FlopCounter(model)
    full = counter.count(mask, training=False).lora
    for module in model.modules():
        if hasattr(module, "active_rank"):
            module.active_rank = 2
    try:
        assert counter.count(mask, training=False).lora == full / 2
    finally:
        for module in model.modules():
            if hasattr(module, "active_rank"):
                module.active_rank = 4


def test_payload_bytes_and_costs_per_tier(tiny_bert, tiny_task):
    results = {m: run_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method=m),
                                 show_progress=False) for m in ("smoe", "hetlora")}
    smoe = results["smoe"]
    trainable = smoe.parameters["total_trainable"]
    layers, experts = 2, 4
    for client in smoe.history[0].cost.clients:
        assert client.download_bytes == 4 * trainable  # float32 tensors the client starts from
        assert client.upload_bytes == 4 * trainable + 8 * (layers * experts + layers)  # deltas + float64 counts
    # HetLoRA: a beta = 0.5 client sends and receives ranks 0..1 of 4 of every adapter, the head whole
    het = results["hetlora"]
    params = het.parameters
    adapters = params["total_trainable"] - params["head"]
    by_budget = {c.budget: c for c in het.history[0].cost.clients}
    assert by_budget[1.0].download_bytes == 4 * params["total_trainable"]
    assert by_budget[0.5].download_bytes == 4 * (adapters // 2 + params["head"])
    # the low tier computes less per token, in training and at inference
    for run in results.values():
        tiers = run.cost.tiers
        assert tiers["0.5"].train_flops_per_token < tiers["1.0"].train_flops_per_token
        assert tiers["0.5"].inference_flops_per_token < tiers["1.0"].inference_flops_per_token
        assert run.cost.peak_rss_mb > 0
        assert all(c.train_seconds > 0 for h in run.history for c in h.cost.clients)


def test_pseudo_gradient_work_is_counted_in_training_only(one_layer_model):
    from ubsmoe.model.pseudo_gradient import PseudoGradient

    model = one_layer_model
    model.set_top_k(1)
    mask = torch.ones(1, 3, dtype=torch.long)
    counter = FlopCounter(model)
    layer = model.moe_layers[0]
    layer.hooks.append(PseudoGradient(rho=0.75))
    try:
        # 4 T E r h_E per adapted matrix: 4 * 3 * 4 * 4 * 16 * 2
        assert counter.count(mask, training=True).hooks == 6_144
        assert counter.count(mask, training=False).hooks == 0
        model.set_top_k(4)  # every expert active: nothing to pseudo-update
        assert counter.count(mask, training=True).hooks == 0
    finally:
        layer.hooks.clear()


def _torch_and_counted_flops(folder, monkeypatch, shared: int, k: int, pg: bool):
    """One training pass of a 2-block model of M = 4 experts (S = ``shared`` of them shared, k routed
    beside them), rank 4, on a (2, 5) batch of 7 real tokens: what torch's FlopCounterMode saw (the fused
    expert matmuls run as plain per-expert matmuls so that it sees them all) and what ``FlopCounter``
    counts. With ``pg`` the pseudo-gradient's hooks run (the model-width LoRA products over every expert);
    without, the layer computes over the slots."""
    from torch.utils.flop_counter import FlopCounterMode

    from ubsmoe.model import grouped_lora
    from ubsmoe.model.pseudo_gradient import PseudoGradient

    monkeypatch.setattr(grouped_lora, "_HAS_GROUPED_MM", False)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    ids = torch.randint(5, 20, mask.shape, generator=torch.Generator().manual_seed(0))
    model = build_model(ModelSpec(backbone=str(folder), num_experts=4, lora_rank=4, router_init="centroid",
                                  shared_experts=shared), classification_head(3), calibration_batches=[(ids, mask)])
    model.set_top_k(k)
    for layer in model.moe_layers:
        layer.hooks.extend([PseudoGradient(rho=0.5)] if pg else [])
    counter = FlopCounter(model)
    with FlopCounterMode(display=False) as torch_count:
        model(ids, mask).sum().backward()
        for layer in model.moe_layers:
            for hook in layer.hooks:
                hook.apply(layer)
    return torch_count.get_total_flops(), counter.count(mask, training=True)


@pytest.mark.parametrize("pg", [True, False], ids=["pseudo-gradient: every expert", "no hook: per slot"])
@pytest.mark.parametrize("shared, k", [(0, 1), (0, 2), (0, 4), (1, 1), (1, 2), (1, 3)])
def test_flop_counter_agrees_with_torch_on_every_matmul_run(tmp_path, monkeypatch, shared, k, pg):
    """BERT-shaped blocks (the first reads the frozen embeddings: no input gradients), d = 32, experts of
    h = 16, with a shared expert (S = 1 of M = 4: k of the 3 routed experts beside it) or without."""
    torch_total, counted = _torch_and_counted_flops(write_tiny_bert(tmp_path, hidden=32, layers=2, ffn=64),
                                                    monkeypatch, shared, k, pg)
    # What torch does not see: CPU attention through SDPA (scores and values, forward and backward),
    # 3 * 2 * 2 * B * S^2 * 32 per block = 38,400 for two blocks.
    # What torch sees and the counter leaves out: the bias column and the alignment padding of the fused
    # routed matmuls (K < M). The up-projection's inputs take 44 columns (32 + the bias column, rounded
    # so that 44 + r = 48 makes 64-byte rows), 12 more than d, forward and input gradient:
    # 2 * 2 * 7 K * 12 * 16 = 5,376 K per block; the down-projection's forward carries 12 padding
    # columns after its 32 + r: 2 * 7 K * 16 * 12 = 2,688 K per block. None at K = M (no padding there).
    # The attention adapters add x A B to the frozen product by an in-place addmm_, which torch's counter
    # skips: 2 * 10 positions * r * 32 = 2,560 for each of the 4 adapted projections (query and value,
    # two blocks).
    # The shared part runs as one dense expert (no padding, nothing routed).
    routed = 4 - shared
    fused_extra = (5_376 + 2_688) * k * 2 if k < routed else 0
    assert torch_total == counted.total - 38_400 + fused_extra - 4 * 2_560
    assert counted.hooks > 0 if pg and k < routed else counted.hooks == 0
    assert counted.experts == 2 * 2 * 7 * (k + shared) * 32 * 16 * 2 * 2  # K_c = k + S experts' slots, 2 blocks


@pytest.mark.parametrize("pg", [True, False], ids=["pseudo-gradient: every expert", "no hook: per slot"])
@pytest.mark.parametrize("shared, k", [(0, 1), (0, 2), (0, 4), (1, 1), (1, 3)])
def test_flop_counter_agrees_with_torch_on_a_gated_backbone(tmp_path, monkeypatch, shared, k, pg):
    """Llama-shaped blocks (SwiGLU experts: gate and up run fused, ``model/fused_gate_up.py``), d = 32,
    experts of h = 16, 4 query and 2 key-value heads of width 8, no biases."""
    torch_total, counted = _torch_and_counted_flops(write_tiny_llama(tmp_path, hidden=32, layers=2, ffn=64),
                                                    monkeypatch, shared, k, pg)
    # What torch does not see: CPU attention through SDPA, 3 * 2 * 2 * B * S^2 * 32 per block = 38,400 for
    # two blocks; the attention adapters' in-place addmm_, 2 * 10 positions * r * out: query (out 32)
    # 2,560 and value (out 16) 1,280 per block.
    # What torch sees and the counter leaves out, per routed slot and block (K < M): the fused gate-up
    # inputs take 40 columns (32 rounded so that 40 + 2r = 48 makes 64-byte rows), 8 padding columns,
    # forward 2 * 8 * 2h = 512 and input gradient 2 * 2h * 8 = 512; the backward's product carries s B_gate
    # and s B_up side by side under all 2h columns, so it also runs the two zero blocks, 2 * 2 * h * r = 256;
    # the down-projection's forward carries 12 padding columns after its 32 + r: 2 * h * 12 = 384.
    # 1,664 per slot, 7 K slots, two blocks.
    routed = 4 - shared
    fused_extra = 1_664 * 7 * k * 2 if k < routed else 0
    assert torch_total == counted.total - 38_400 - 2 * (2_560 + 1_280) + fused_extra
    assert counted.hooks > 0 if pg and k < routed else counted.hooks == 0
    # 2 FLOPs a multiply-add, forward and input gradient, gate, up and down, K_c = k + S experts' slots, 2 blocks
    assert counted.experts == 2 * 2 * 3 * 7 * (k + shared) * 32 * 16 * 2


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("shared, k", [(0, 1), (0, 2), (0, 4), (1, 1), (1, 3)])
def test_flop_counter_agrees_with_torch_in_evaluation(tmp_path, monkeypatch, family, shared, k):
    """Evaluation through merged weights (58 tokens: merging pays) runs what the counter counts: the LoRA
    factors are detached without gradients, so no A columns and no x A_e for every expert."""
    from torch.utils.flop_counter import FlopCounterMode

    from ubsmoe.model import grouped_lora

    monkeypatch.setattr(grouped_lora, "_HAS_GROUPED_MM", False)
    write = write_tiny_bert if family == "bert" else write_tiny_llama
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 10:] = 0
    ids = torch.randint(5, 20, mask.shape, generator=torch.Generator().manual_seed(0))
    model = build_model(ModelSpec(backbone=str(write(tmp_path, hidden=32, layers=2, ffn=64)), num_experts=4,
                                  lora_rank=4, router_init="centroid", shared_experts=shared),
                        classification_head(3), calibration_batches=[(ids, mask)])
    model.set_top_k(k)
    assert all(layer.merges(58 * k, grad=False) for layer in model.moe_layers)
    counter = FlopCounter(model)
    with torch.no_grad(), FlopCounterMode(display=False) as torch_count:
        model(ids, mask)
    counted = counter.count(mask, training=False)
    # What torch does not see: CPU attention through SDPA, 2 * 2 * B * S^2 * 32 per block = 262,144 for two
    # blocks; the attention adapters' in-place addmm_, 2 * 64 positions * r * out: BERT's query and value
    # (out 32) 16,384 each, Llama's query (out 32) 16,384 and value (out 16) 8,192, per block.
    # What torch sees and the counter leaves out, per routed slot and block (K < M): the padding columns of
    # the up-projection's inputs, BERT's 12 (2 * 12 * h = 384), Llama's fused gate-up 8 (2 * 8 * 2h = 512).
    adapters = 2 * (2 * 16_384 if family == "bert" else 16_384 + 8_192)
    padding = (384 if family == "bert" else 512) * 58 * k * 2 if k < 4 - shared else 0
    assert torch_count.get_total_flops() == counted.total - 262_144 - adapters + padding
