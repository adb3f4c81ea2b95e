"""Activation checkpointing of the attention blocks keeps fewer tensors for the backward and changes no
number: the same gradients in one step, the same run with dropout on."""

import pytest
import torch

from test_engine import without_timings
from tiny_experiment import causal_overrides, tiny_overrides
from ubsmoe.config import load_config
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.model.activation_checkpointing import attention_blocks, set_attention_checkpointing


def saved_bytes_and_grads(model, task, batch, on: bool) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes autograd keeps for the backward of one training loss, and the gradients it gives."""
    set_attention_checkpointing(model, on)
    model.train()
    model.zero_grad()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    torch.manual_seed(0)  # dropout draws the same masks in both passes
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = task.loss(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    set_attention_checkpointing(model, False)
    return sum(saved.values()), grads


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_llama"])
def test_recomputed_attention_keeps_less_for_the_backward_and_gives_the_same_gradients(backbone, tiny_task, request):
    config = load_config(overrides=tiny_overrides(request.getfixturevalue(backbone), tiny_task,
                                                  **{"model.dropout": 0.1}), method="ubsmoe")
    exp = build_experiment(config)
    exp.method.setup_client(exp.model, exp.method.tier_settings(0.5))
    batch = exp.train.batch(torch.arange(8))

    kept, plain = saved_bytes_and_grads(exp.model, exp.task, batch, on=False)
    recomputed, checkpointed = saved_bytes_and_grads(exp.model, exp.task, batch, on=True)

    assert len(attention_blocks(exp.model)) == 2  # one per layer of the tiny backbones
    assert recomputed < kept
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_a_causal_lm_step_recomputes_its_attention_without_a_key_value_cache(tiny_causal_llama, tiny_suite):
    """A decoder builds a key-value cache by default; training builds none, else each recomputed block would
    append its keys and values to it again (a shape error on padded commonsense batches)."""
    config = load_config(overrides=causal_overrides(tiny_causal_llama, tiny_suite), method="ubsmoe")
    exp = build_experiment(config)
    exp.method.setup_client(exp.model, exp.method.tier_settings(0.5))
    batch = exp.train.batch(torch.arange(4))
    assert not bool(batch[1].all())  # padded: the attention mask is a tensor, not causal-only

    kept, plain = saved_bytes_and_grads(exp.model, exp.task, batch, on=False)
    recomputed, checkpointed = saved_bytes_and_grads(exp.model, exp.task, batch, on=True)

    assert recomputed < kept and plain.keys() == checkpointed.keys() and len(plain) > 0
    for name in plain:
        assert torch.equal(plain[name], checkpointed[name]), name


def test_a_pre_norm_layer_recomputes_its_norm_with_the_attention(tiny_llama, tiny_task, monkeypatch):
    """Llama's input_layernorm runs inside the recomputed region: the block keeps the residual stream only,
    fewer bytes than attention alone, and the same gradients; switched off, the norm is itself again."""
    import ubsmoe.model.activation_checkpointing as checkpointing

    config = load_config(overrides=tiny_overrides(tiny_llama, tiny_task), method="ubsmoe")
    exp = build_experiment(config)
    exp.method.setup_client(exp.model, exp.method.tier_settings(0.5))
    batch = exp.train.batch(torch.arange(8))
    layers = exp.model.family.layers(exp.model.backbone)
    assert all(checkpointing.pre_attention_norm(layer, layer.self_attn) is layer.input_layernorm for layer in layers)

    kept, plain = saved_bytes_and_grads(exp.model, exp.task, batch, on=False)
    fused, with_norm = saved_bytes_and_grads(exp.model, exp.task, batch, on=True)
    assert all("forward" not in vars(layer.input_layernorm) for layer in layers)  # switched off: the norm again
    monkeypatch.setattr(checkpointing, "pre_attention_norm", lambda layer, block: None)
    attention_only, without_norm = saved_bytes_and_grads(exp.model, exp.task, batch, on=True)

    # The norm no longer keeps its input apart from the block (autograd's pack hooks do not see what a
    # recomputed region keeps of its inputs, so this counts at least one (batch, length, d) float32 tensor)
    tokens, d = batch[1].numel(), exp.model.backbone.config.hidden_size
    assert attention_only - fused >= tokens * d * 4
    assert fused < attention_only < kept
    for name in plain:
        assert torch.equal(plain[name], with_norm[name]) and torch.equal(plain[name], without_norm[name]), name


def test_a_run_with_checkpointing_gives_the_numbers_of_one_without(tiny_bert, tiny_task, monkeypatch):
    import ubsmoe.model.activation_checkpointing as checkpointing

    calls = []
    real = checkpointing.checkpoint
    monkeypatch.setattr(checkpointing, "checkpoint", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    overrides = tiny_overrides(tiny_bert, tiny_task, **{"model.dropout": 0.1})
    runs = []
    for on in ("false", "true"):
        runs.append(run_experiment(load_config(overrides=overrides + [f"train.activation_checkpointing={on}"]),
                                   show_progress=False))
        if on == "false":
            assert calls == []
    # 2 rounds x 2 clients x 3 steps x 2 layers, each recomputed in the backward: the setting reached training
    assert len(calls) == 24
    assert without_timings(runs[0].to_json()["history"]) == without_timings(runs[1].to_json()["history"])
