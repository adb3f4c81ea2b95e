"""precision=bf16: frozen weights in bfloat16, trained tensors in float32, every method end to end; a LoRA
update far below bf16's rounding step still changes the output, because it is never folded into bf16
weights (the folded weight would not change at all); devices: cpu, auto, and cuda refused without one."""

import math

import pytest
import torch
import torch.nn.functional as F

from tiny_checkpoints import PROMPT_WORDS, WORDS, write_tiny_moe
from tiny_experiment import assert_every_client_answered, causal_overrides, tiny_overrides, write_tiny_suite
from ubsmoe.config import ConfigError, load_config
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.methods import REGISTRY
from ubsmoe.model.lora import LoRALinear
from ubsmoe.model.moe_layer import SparseMoEFFN


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_runs_in_bf16(tiny_bert, tiny_task, method):
    overrides = tiny_overrides(tiny_bert, tiny_task, precision="bf16", **{"federation.rounds": 1})
    exp = build_experiment(load_config(overrides=overrides, method=method))
    model = exp.model
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    assert model.backbone.get_input_embeddings().weight.dtype == torch.bfloat16
    adapted = {m.base.weight.dtype for m in model.modules() if isinstance(m, LoRALinear)}
    adapted |= {layer.w_up.dtype for layer in model.moe_layers}
    # FLoRA and FLoRIST fold each round's update into the adapted matrices: those stay float32
    assert adapted == ({torch.float32} if REGISTRY[method].merges_into_base else {torch.bfloat16})

    results = run_experiment(load_config(overrides=overrides, method=method), show_progress=False)

    assert math.isfinite(results.final.test_loss)
    assert all(math.isfinite(c.train_loss) for c in results.history[-1].clients)
    assert_every_client_answered(results)


def test_bf16_gives_the_float32_numbers_within_its_rounding(tiny_bert, tiny_task):
    fp32 = run_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method="ubsmoe"),
                          show_progress=False)
    bf16 = run_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task, precision="bf16"),
                                      method="ubsmoe"), show_progress=False)
    assert bf16.final.test_loss == pytest.approx(fp32.final.test_loss, abs=5e-3)
    assert bf16.final.test_loss != fp32.final.test_loss  # it did run in another precision


def rank_one(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """A random rank-1 matrix (or stack of them) in bf16: u v^T per leading index."""
    u = torch.randn(*shape[:-1], 1, generator=generator)
    v = torch.randn(*shape[:-2], 1, shape[-1], generator=generator)
    return (u @ v * 0.1).to(torch.bfloat16)


def set_relative_update(a: torch.Tensor, b: torch.Tensor, weight_in_out: torch.Tensor, scale: float) -> None:
    """Rank-1 factors a (..., in, r), b (..., r, out) with scale * a @ b = 1e-4 * W for a rank-1 W (in, out)."""
    u, s, vh = torch.linalg.svd(weight_in_out.float(), full_matrices=False)
    with torch.no_grad():
        a.zero_(), b.zero_()
        a[..., :, 0] = u[..., :, 0] * s[..., :1] * 1e-4 / scale
        b[..., 0, :] = vh[..., 0, :]


def test_a_lora_update_of_1e_4_relative_still_changes_the_bf16_output():
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(64, 48).to(torch.bfloat16)
    with torch.no_grad():
        base.weight.copy_(rank_one(generator, 48, 64))
    layer = LoRALinear(base, rank=4, alpha=8, generator=generator)
    x = torch.randn(256, 64, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        before = layer(x)
        set_relative_update(layer.lora_a, layer.lora_b, base.weight.T, layer.scale)
        update = (layer.scale * layer.lora_a @ layer.lora_b).T
        torch.testing.assert_close(update, 1e-4 * base.weight.float(), rtol=2e-2, atol=1e-8)
        after = layer(x)
    folded = (base.weight.float() + update).to(torch.bfloat16)
    assert torch.equal(folded, base.weight)  # folded into the bf16 weight, the update is gone entirely
    assert not torch.equal(after, before)  # computed apart, it shows
    assert after.dtype == torch.bfloat16

    experts, d, h = 4, 32, 64
    moe = SparseMoEFFN((torch.randn(experts, d, h, generator=generator) * 0.2).to(torch.bfloat16),
                       rank_one(generator, experts, h, d), F.gelu,
                       router_weight=torch.randn(experts, d, generator=generator), lora_rank=4, generator=generator)
    moe.set_top_k(2)
    tokens = torch.randn(2, 128, d, generator=generator).to(torch.bfloat16)
    with torch.no_grad():
        before = moe(tokens)
        set_relative_update(moe.lora_down_a, moe.lora_down_b, moe.w_down, moe.lora_scale)
        folded = (moe.w_down.float() + moe.lora_scale * moe.lora_down_a @ moe.lora_down_b).to(torch.bfloat16)
        after = moe(tokens)
    assert torch.equal(folded, moe.w_down)
    assert after.dtype == torch.bfloat16 and not torch.equal(after, before)


def test_a_native_moe_loads_straight_in_bf16(tmp_path):
    folder = write_tiny_moe(tmp_path / "olmoe", "olmoe", words=tuple(WORDS) + tuple(PROMPT_WORDS))
    (tmp_path / "suite").mkdir()
    suite = write_tiny_suite(tmp_path / "suite")
    exp = build_experiment(load_config(overrides=causal_overrides(folder, suite, precision="bf16"), method="ubsmoe"))
    moe = exp.model.moe_layers[0]
    assert moe.w_up.dtype == torch.bfloat16 and moe.lora_up_a.dtype == torch.float32
    assert moe.w_up.untyped_storage().data_ptr() == moe.w_gate.untyped_storage().data_ptr()  # still views
    assert exp.model.head.weight.dtype == torch.bfloat16  # OLMoE's own (untied) lm_head, cast with the rest


def test_a_tied_language_model_head_stays_the_embedding_in_bf16(tiny_causal_llama, tiny_suite):
    """SmolLM2 ties its LM head to the input embedding: in bf16 (and on any device) that is one matrix, not a
    second copy of the vocabulary beside the embedding."""
    exp = build_experiment(load_config(overrides=causal_overrides(tiny_causal_llama, tiny_suite, precision="bf16"),
                                       method="ubsmoe"))
    embedding = exp.model.backbone.get_input_embeddings().weight
    assert embedding.dtype == torch.bfloat16 and exp.model.head.weight is embedding
    exp.model.to(torch.float64)  # Module.to, as a move to a device: parameters and buffers are converted apart
    embedding = exp.model.backbone.get_input_embeddings().weight
    assert embedding.dtype == torch.float64 and exp.model.head.weight is embedding


def test_devices(tiny_bert, tiny_task, tmp_path, capsys):
    from ubsmoe.cli import main

    exp = build_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task, device="auto")))
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert {p.device.type for p in exp.model.parameters()} == {expected}
    if not torch.cuda.is_available():
        assert main(["run", "--quiet", "--out", str(tmp_path)] + tiny_overrides(tiny_bert, tiny_task, device="cuda")) == 2
        assert "device=cuda, but torch sees no CUDA device here" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="device must be cpu, cuda or auto"):
        build_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task, device="tpu")))
