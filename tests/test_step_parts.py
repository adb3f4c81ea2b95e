"""Timing hooks that split a local step into its parts: they change nothing and come off cleanly."""

import time
from types import SimpleNamespace

import torch

from ubsmoe.bench.step_parts import PARTS, StepParts
from ubsmoe.config import load_config
from ubsmoe.engine.local_training import local_step
from ubsmoe.engine.experiment import build_experiment

from tiny_experiment import tiny_overrides


def _two_steps(exp, start: dict, with_parts: bool):
    """Two seeded UB-SMoE steps of a low-tier client from the trainable tensors ``start``; returns
    (losses, trainable tensors after, parts or None, the steps' seconds)."""
    model, method = exp.model, exp.method
    model.load_trainable_state(start)
    method.setup_client(model, method.tier_settings(0.5))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.01)
    batch = exp.train.batch(torch.arange(8))
    hooks = StepParts(model, method, optimizer) if with_parts else None
    torch.manual_seed(0)
    started = time.perf_counter()
    losses = [local_step(model, exp.task, method, batch, optimizer).item() for _ in range(2)]
    seconds = time.perf_counter() - started
    parts = hooks.split(seconds) if hooks is not None else None
    if hooks is not None:
        hooks.close()
    method.teardown_client(model)
    return losses, {n: t.clone() for n, t in model.trainable_state().items()}, parts, seconds


def test_step_parts_change_nothing_and_come_off(tiny_bert, tiny_task):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method="ubsmoe")
    exp = build_experiment(config)
    start = {n: t.clone() for n, t in exp.method.initial_state(exp.model).params.items()}
    plain_losses, plain_state, _, _ = _two_steps(exp, start, with_parts=False)
    losses, state, parts, seconds = _two_steps(exp, start, with_parts=True)

    assert losses == plain_losses
    assert all(torch.equal(state[n], plain_state[n]) for n in plain_state)
    assert set(parts) == set(PARTS)
    # K = 2 of 4: the FFN layers run both ways and the pseudo-gradient runs after the backward
    assert all(parts[p] > 0 for p in ("ffn_forward", "ffn_backward", "method_gradients", "optimizer"))
    # rest: what the hooked parts leave of the steps' own time (measured, so that a slow machine passes too)
    assert abs(sum(parts.values()) - seconds) < 1e-9 and parts["rest"] > 0
    for layer in exp.model.moe_layers:
        assert not (layer._forward_pre_hooks or layer._forward_hooks or layer._backward_pre_hooks
                    or layer._backward_hooks)
    assert "after_backward" not in vars(exp.method)


def test_step_parts_time_the_shared_part_as_ffn(tiny_llama, tiny_task):
    """With shared experts, the always-on part is FFN work: hooked while open, unhooked after."""
    config = load_config(overrides=tiny_overrides(tiny_llama, tiny_task, **{"model.shared_experts": 1}), method="ubsmoe")
    exp = build_experiment(config)
    model, method = exp.model, exp.method
    assert len(model.shared_layers) == len(model.moe_layers) > 0
    model.load_trainable_state(method.initial_state(model).params)
    method.setup_client(model, method.tier_settings(0.5))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with StepParts(model, method, optimizer) as hooks:
        assert all(layer._forward_hooks and layer._backward_hooks for layer in model.shared_layers)
        local_step(model, exp.task, method, exp.train.batch(torch.arange(8)), optimizer)
        parts = hooks.split(1.0)
    assert parts["ffn_forward"] > 0 and parts["ffn_backward"] > 0
    assert not any(layer._forward_pre_hooks or layer._forward_hooks or layer._backward_pre_hooks
                   or layer._backward_hooks for layer in model.shared_layers)


def test_step_parts_reset_after_each_split(tiny_bert, tiny_task):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method="smoe")
    exp = build_experiment(config)
    model, method = exp.model, exp.method
    model.load_trainable_state(method.initial_state(model).params)
    method.setup_client(model, method.tier_settings(1.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with StepParts(model, method, optimizer) as hooks:
        local_step(model, exp.task, method, exp.train.batch(torch.arange(8)), optimizer)
        first = hooks.split(1.0)
        second = hooks.split(0.5)
    assert first["ffn_forward"] > 0 and first["optimizer"] > 0
    assert second == {"ffn_forward": 0.0, "ffn_backward": 0.0, "method_gradients": 0.0, "optimizer": 0.0, "rest": 0.5}
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_step_parts_put_back_a_wrapper_that_was_there():
    class Method:
        def after_backward(self, model):
            return "class"

    method, model = Method(), SimpleNamespace(moe_layers=[])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    method.after_backward = lambda model: "instance"  # e.g. another StepParts still open
    with StepParts(model, method, optimizer) as hooks:
        assert method.after_backward(None) == "instance"
        assert hooks.split(1.0)["method_gradients"] > 0
    assert method.after_backward(None) == "instance"
    del method.after_backward
    with StepParts(model, method, optimizer):
        pass
    assert "after_backward" not in vars(method) and method.after_backward(None) == "class"
