"""Native MoE checkpoints (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE) read as they are: each sparse block runs
through ubsmoe's MoE layer over the checkpoint's own expert tensors (views, no copy), with its router, its
top-k and its gate rule, and gives the original block's output (zero LoRA, the model's own K); the whole
backbone gives the original hidden states; every method trains on it end to end."""

import math

import pytest
import torch

from tiny_checkpoints import NATIVE_MOE_FAMILIES, PROMPT_WORDS, WORDS, write_tiny_moe
from tiny_experiment import assert_every_client_answered, causal_overrides
from ubsmoe.config import load_config
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.methods import REGISTRY
from ubsmoe.model import ModelSpec, build_model
from ubsmoe.model.pretrained import NativeShape, native_moe_shape
from ubsmoe.model.shared_expert import SharedExpertMoE
from ubsmoe.tasks.causal_lm import language_model_head

CASES = [(family, renormalise) for family in NATIVE_MOE_FAMILIES for renormalise in (False, True)
         if not (family == "mixtral" and not renormalise)]  # Mixtral always renormalises its top-k


@pytest.fixture(scope="module")
def tiny_moes(tmp_path_factory):
    folders = {}

    def get(family: str, renormalise: bool = True):
        if (family, renormalise) not in folders:
            folder = tmp_path_factory.mktemp(f"{family}-{renormalise}")
            folders[family, renormalise] = write_tiny_moe(folder, family, words=tuple(WORDS) + tuple(PROMPT_WORDS),
                                                          renormalise=renormalise)
        return folders[family, renormalise]
    return get


@pytest.mark.parametrize("family, renormalise", CASES)
def test_each_converted_block_and_the_backbone_equal_the_original(tiny_moes, family, renormalise):
    from transformers import AutoModelForCausalLM

    folder = tiny_moes(family, renormalise)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    ours = build_model(ModelSpec(backbone=str(folder), lora_rank=4), language_model_head(str(folder))).eval()
    assert native_moe_shape(str(folder)) == NativeShape(4, 2) and len(ours.moe_layers) == 2
    # every RMSNorm (the blocks', the final one, and OLMoE's and Qwen3-MoE's query and key norms) is ubsmoe's
    norms = [type(m).__name__ for m in ours.backbone.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms and set(norms) == {"FastRMSNorm"}, norms
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=generator)
    with torch.no_grad():
        for layer, original in zip(ours.family.layers(ours.backbone), reference.model.layers):
            block = layer.mlp
            moe = block.routed if family == "qwen2_moe" else block
            assert isinstance(block, SharedExpertMoE) == (family == "qwen2_moe")
            assert moe.top_k == 2 and moe.gate_mode == ("softmax_renorm" if renormalise else "softmax")
            # views of the checkpoint's fused gate_up tensor, not copies
            assert moe.w_up.untyped_storage().data_ptr() == moe.w_gate.untyped_storage().data_ptr()
            torch.testing.assert_close(block(x), original.mlp(x), atol=1e-6, rtol=1e-5)
            moe.set_top_k(4)  # another K is another block: the check above is not vacuous
            assert (block(x) - original.mlp(x)).abs().max() > 1e-3
            moe.set_top_k(2)

        ids = torch.randint(3, 40, (2, 9), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding
        hidden = ours.hidden_states(ids, mask)
        expected = reference.model(input_ids=ids, attention_mask=mask).last_hidden_state
        real = mask.bool()
        torch.testing.assert_close(hidden[real], expected[real], atol=1e-5, rtol=1e-4)
        logits = ours.head(hidden, real)
        torch.testing.assert_close(logits, reference.lm_head(expected)[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_fine_tunes_a_native_moe(tiny_moes, tiny_suite, method):
    cheap = {"evaluation.round0": "false", "data.max_test_samples": 2, "train.local_steps": 1,
             "evaluation.max_new_tokens": 3}
    config = load_config(overrides=causal_overrides(tiny_moes("olmoe"), tiny_suite, **cheap), method=method)

    results = run_experiment(config, show_progress=False)

    assert results.k_max == 2  # the checkpoint's top-k; M = 4 from its config, not model.num_experts
    assert all(math.isfinite(c.train_loss) for c in results.history[-1].clients)
    assert_every_client_answered(results)
    assert set(results.final.tier_accuracy) == {"0.5", "1.0"}


@pytest.mark.parametrize("family", NATIVE_MOE_FAMILIES)
def test_clients_route_their_own_k_in_every_family(tiny_moes, tiny_suite, family):
    config = load_config(overrides=causal_overrides(tiny_moes(family), tiny_suite, **{"model.top_k_max": 3}),
                         method="ubsmoe")
    exp = build_experiment(config)
    assert exp.method.k_max == 3 and exp.model.num_experts == 4

    results = run_experiment(config, show_progress=False)

    last = results.history[-1]
    assert results.k_max == 3
    assert all(math.isfinite(c.train_loss) for c in last.clients)
    for tier, k in (("0.5", 1), ("1.0", 3)):  # K_c = floor(3 beta) experts per token, in every layer
        assert [sum(layer) for layer in last.tier_expert_load[tier]] == pytest.approx([k, k])
    assert last.balance.experts_without_update < 1


def test_top_k_max_beyond_the_checkpoints_experts_is_refused(tiny_moes, tiny_suite, tmp_path, capsys):
    from ubsmoe.cli import main

    assert main(["run", "--quiet", "--out", str(tmp_path)]
                + causal_overrides(tiny_moes("olmoe"), tiny_suite, **{"model.top_k_max": 5})) == 2
    assert "model.top_k_max=5 exceeds the 4 experts per layer of" in capsys.readouterr().err


def test_a_shared_expert_counts_under_experts(tiny_moes):
    """Qwen2-MoE's always-on shared expert (and its gate) is expert work on every position, not attention."""
    from ubsmoe.metrics.flops import FlopCounter
    from ubsmoe.model.lora import LoRALinear

    folder = tiny_moes("qwen2_moe")
    model = build_model(ModelSpec(backbone=str(folder), lora_rank=4), language_model_head(str(folder))).eval()
    ids = torch.randint(3, 40, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with FlopCounter(model) as counter, torch.no_grad():
        model(ids, mask)
        flops = counter.count(mask, training=False)
    positions, blocks = ids.numel(), model.family.layers(model.backbone)

    def matmul(linear):
        return 2 * positions * linear.in_features * linear.out_features

    shared = sum(matmul(m) for block in blocks for part in (block.mlp.shared, block.mlp.shared_gate)
                 for m in part.modules() if isinstance(m, torch.nn.Linear))
    routed = sum(2 * positions * moe.top_k * moe.d_model * moe.d_hidden * len(moe.adapted) for moe in model.moe_layers)
    projections = sum(matmul(m.base if isinstance(m, LoRALinear) else m) for block in blocks
                      for m in block.self_attn.modules() if isinstance(m, (LoRALinear, torch.nn.Linear))
                      and not any(m is lora.base for lora in block.self_attn.modules() if isinstance(lora, LoRALinear)))
    scores = 2 * 2 * 2 * 5 * 5 * counter.attention_width * len(blocks)
    assert shared > 0
    assert flops.experts == routed + shared
    assert flops.attention == projections + scores
