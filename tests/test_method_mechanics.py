"""Mechanics of the sparse methods that the end-to-end runs do not pin down: DMR's local gradient on phi,
what evaluation attaches, A3SMoE's tempered aggregation and per-K scales, smoe-bias's selection bias and
its update, and the gradient of smoe-aux's Switch loss."""

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from tiny_experiment import tiny_overrides
from test_moe_layer import D, E, dense_ffn, moe_from
from ubsmoe.config import load_config
from ubsmoe.engine.evaluation import evaluate_tiers
from ubsmoe.engine.client_round import run_client
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.server import instruction_for
from ubsmoe.methods.a3smoe import OutputRescaling
from ubsmoe.methods.base import ClientInfo, ClientUpdate, RoutingStats
from ubsmoe.methods.smoe_aux import SMoEAux, SMoEAuxOptions
from ubsmoe.methods.smoe_bias import SelectionBias
from ubsmoe.methods.ubsmoe import UBSMoE, UBSMoEOptions
from ubsmoe.model.modulated_routing import ModulatedRouting, attach_phi
from ubsmoe.model.pseudo_gradient import PseudoGradient
from ubsmoe.methods.a3smoe import KScales


def experiment(tiny_bert, tiny_task, method, *extra):
    return build_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task) + list(extra), method=method))


# ---------------------------------------------------------------------------------------- DMR: phi's gradient
@pytest.mark.parametrize("gate_mode", ["straight_through", "softmax"])
def test_phi_gradient_matches_finite_differences_and_the_regulariser_adds_to_it(gate_mode):
    """phi learns locally through the routing probabilities (SPEC 4): its autograd gradient equals a
    float64 central difference of the gate-weighted loss, is exactly zero for an expert outside every
    token's candidate set, and UBSMoE.local_loss adds exactly the range regulariser's gradient.

    Under straight-through gates the forward value does not depend on p; its gradient is by definition
    that of the same layer with gate value p (``softmax``), so the difference is taken there."""
    layer = moe_from(dense_ffn(False)).double()
    layer.gate_mode = gate_mode
    layer.set_top_k(1)
    layer.hooks = [ModulatedRouting(candidates=2)]
    attach_phi(layer)
    layer.modulation.data = torch.tensor([0.8, -0.7, 0.15, -0.1], dtype=torch.float64)  # two outside [-0.5, 0.5]
    layer.modulation.requires_grad_(True)
    g = torch.Generator().manual_seed(3)  # seed 3: expert 0 is in no token's top-2 raw scores
    x = torch.randn(1, 5, D, generator=g, dtype=torch.float64)
    upstream = torch.randn(1, 5, D, generator=g, dtype=torch.float64)
    outside = sorted(set(range(E)) - set(layer.router(x[0]).topk(2, -1).indices.flatten().tolist()))
    assert outside == [0]

    def task_loss() -> torch.Tensor:
        return (layer(x) * upstream).sum()

    def value_with_gate_p(phi: torch.Tensor) -> float:
        mode, layer.gate_mode = layer.gate_mode, "softmax"
        try:
            with torch.no_grad():
                layer.modulation.copy_(phi)
                return task_loss().item()
        finally:
            layer.gate_mode = mode

    method = UBSMoE(UBSMoEOptions(phi_range_weight=0.05, phi_min=-0.5, phi_max=0.5), k_max=2)
    model = SimpleNamespace(moe_layers=[layer])
    phi0 = layer.modulation.detach().clone()

    (task_grad,) = torch.autograd.grad(task_loss(), [layer.modulation])
    selected = layer.last_routing.experts.clone()
    h = 1e-6
    numeric = torch.zeros(E, dtype=torch.float64)
    for i in range(E):
        step = torch.zeros(E, dtype=torch.float64)
        step[i] = h
        numeric[i] = (value_with_gate_p(phi0 + step) - value_with_gate_p(phi0 - step)) / (2 * h)
    with torch.no_grad():
        layer.modulation.copy_(phi0)
    (total_grad,) = torch.autograd.grad(task_loss() + method.local_loss(model), [layer.modulation])

    assert torch.equal(layer.last_routing.experts, selected)  # the differences did not cross a selection boundary
    torch.testing.assert_close(task_grad, numeric, rtol=1e-6, atol=1e-9)
    assert task_grad[0] == 0.0  # expert 0: outside every candidate set, phi_0 never enters a logit
    assert (task_grad[1:].abs() > 1e-4).all()
    # phi_range_weight * d/dphi (ReLU(-0.5 - phi)^2 + ReLU(phi - 0.5)^2) = 0.05 * (2 * 0.3, -2 * 0.2, 0, 0)
    torch.testing.assert_close(total_grad - task_grad, torch.tensor([0.03, -0.02, 0.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------- DMR at evaluation
def test_evaluation_routes_with_dmr_at_the_tier_k_without_pseudo_gradient(tiny_bert, tiny_task):
    """A tier's model routes by s + phi at its K_c (SPEC 6) but runs no pseudo-gradient hook (that is
    training only); teardown_client leaves the layers without hooks."""
    exp = experiment(tiny_bert, tiny_task, "ubsmoe")
    method, model = exp.method, exp.model
    state = method.initial_state(model)
    phi = torch.tensor([0.0, 0.0, 0.0, 50.0])  # N_p = min(4, 2 * 4) = 4: every expert is a candidate
    state = replace(state, params=state.params | {name: phi for name in method.phi_names})
    seen = []
    handles = [layer.register_forward_pre_hook(lambda mod, args: seen.append((mod.top_k, list(mod.hooks))))
               for layer in model.moe_layers]

    try:
        result = evaluate_tiers(model, exp.task, method, state, exp.test, [0.5], batch_size=64)[0.5]
    finally:
        for handle in handles:
            handle.remove()
    method.setup_client(model, method.client_settings(state, ClientInfo(0, 0.5, 10)))  # training, for contrast
    training_hooks = [type(hook) for hook in model.moe_layers[0].hooks]
    method.teardown_client(model)

    assert len(seen) == len(model.moe_layers) * len(list(exp.test.batches(64)))
    for top_k, hooks in seen:
        assert top_k == 2  # K_c = floor(4 * 0.5)
        assert len(hooks) == 1 and isinstance(hooks[0], ModulatedRouting) and hooks[0].candidates == 4
        assert not any(isinstance(hook, PseudoGradient) for hook in hooks)
    for load in result.expert_load:  # phi_3 = 50 puts expert 3 in every token's top-2
        assert load[3] == 1.0 and sum(load) == pytest.approx(2.0)
    assert training_hooks == [ModulatedRouting, PseudoGradient]
    assert all(layer.hooks == [] for layer in model.moe_layers) and method.hooks == []


# ---------------------------------------------------------------------------------------- A3SMoE
def random_update(state, client, layers, tokens, g):
    """Random deltas (0.1 N(0, 1)) for every tensor and random routing counts out of ``tokens`` per layer."""
    delta = {name: torch.randn(value.shape, generator=g) * 0.1 for name, value in state.params.items()}
    routed = torch.stack([torch.randint(0, tokens + 1, (E,), generator=g) for _ in range(layers)]).double()
    return ClientUpdate(client, delta, RoutingStats(routed, torch.full((layers,), float(tokens), dtype=torch.float64)))


def test_a3smoe_tempered_aggregation_and_per_k_scales_by_hand(tiny_bert, tiny_task):
    """t = 2: expert i of each stacked LoRA tensor moves by sum_c w_ci delta_ci with
    w_ci = (a_ci / n_c)^2 |D_c| / sum_c' (...), every other tensor by FedAvg; the K = 2 output scales live
    in the server state, persist through a round without K = 2 clients, accumulate the next K = 2 round,
    and are the ones the K = 2 tier is evaluated with."""
    exp = experiment(tiny_bert, tiny_task, "a3smoe", "method.temperature=2")
    method, model = exp.method, exp.model
    state = method.initial_state(model)
    layers = len(model.moe_layers)
    low, high = ClientInfo(0, 0.5, 10), ClientInfo(1, 1.0, 30)  # K = 2 and K = 4 = K_max
    g = torch.Generator().manual_seed(0)
    updates = [random_update(state, low, layers, 20, g), random_update(state, high, layers, 40, g)]
    scales = method.scale_names
    assert len(scales) == layers and set(method.expert_names) and not set(scales) & set(method.expert_names)

    first = method.aggregate(state, updates)
    second = method.aggregate(first, [random_update(first, high, layers, 40, g)])  # no K = 2 client this round
    starts = [method.client_params(second, ClientInfo(i, 0.5, n)) for i, n in ((2, 10), (3, 20))]
    third_updates = [random_update(second, ClientInfo(2, 0.5, 10), layers, 20, g),
                     random_update(second, ClientInfo(3, 0.5, 20), layers, 20, g)]
    third = method.aggregate(second, third_updates)

    for name, value in state.params.items():
        d0, d1 = updates[0].delta[name].double(), updates[1].delta[name].double()
        if name in method.expert_names:
            layer = method.expert_names[name]
            expected = value.double().clone()
            for i in range(E):
                raw = [(u.routing.routed[layer, i] / u.routing.tokens[layer]) ** 2 * u.client.num_examples
                       for u in updates]
                if sum(raw) > 0:
                    expected[i] += (raw[0] * d0[i] + raw[1] * d1[i]) / sum(raw)
                else:
                    expected[i] += 0.25 * d0[i] + 0.75 * d1[i]
        elif name in scales:
            expected = value.double()  # the global entries stay 1
        else:
            expected = value.double() + 0.25 * d0 + 0.75 * d1
        torch.testing.assert_close(first.params[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
    assert set(first.method.scales) == {2}  # K_max is not rescaled
    k2 = [1.0 + updates[0].delta[n] for n in scales]
    for got, want in zip(method.scales(first, 2), k2):
        torch.testing.assert_close(got, want)
    for got, want in zip(method.scales(second, 2), k2):
        assert torch.equal(got, want)
    for start in starts:  # K = 2 clients start from the stored scales
        assert all(torch.equal(start[n], s) for n, s in zip(scales, k2))
    for got, want, n in zip(method.scales(third, 2), k2, scales):
        torch.testing.assert_close(got, want + (10 * third_updates[0].delta[n] + 20 * third_updates[1].delta[n]) / 30)


def test_a3smoe_evaluates_the_low_tier_with_its_stored_scales(tiny_bert, tiny_task):
    """The K = 2 tier's MoE outputs are its stored scale times the unscaled ones (the first MoE layer,
    whose input the scales do not touch), so changing the stored scale changes the evaluated model; the
    K_max tier runs without rescaling."""
    exp = experiment(tiny_bert, tiny_task, "a3smoe", "method.temperature=2")
    method, model = exp.method, exp.model
    state = method.initial_state(model)
    low = ClientInfo(0, 0.5, 10)
    state = method.aggregate(state, [random_update(state, low, len(model.moe_layers), 20,
                                                   torch.Generator().manual_seed(1))])
    stored = method.scales(state, 2)
    assert all(abs(s.item() - 1) > 1e-3 for s in stored)
    unit = replace(state, method=KScales({2: {n: torch.ones(()) for n in method.scale_names}}))
    first = model.moe_layers[0]
    outputs = []
    handle = first.register_forward_hook(lambda mod, args, out: outputs.append(out.clone()))

    try:
        scaled = evaluate_tiers(model, exp.task, method, state, exp.test, [0.5], batch_size=64)[0.5]
        scaled_out, outputs[:] = list(outputs), []
        plain = evaluate_tiers(model, exp.task, method, unit, exp.test, [0.5], batch_size=64)[0.5]
        plain_out = list(outputs)
    finally:
        handle.remove()
    model.load_trainable_state(method.eval_params(state, 1.0))
    method.setup_client(model, method.eval_settings(state, 1.0))
    top_hooks, top_scale = list(first.hooks), first.output_scale.item()
    method.teardown_client(model)

    assert len(scaled_out) == len(plain_out) > 0
    for s_out, p_out in zip(scaled_out, plain_out):
        torch.testing.assert_close(s_out - first.b_down, stored[0] * (p_out - first.b_down), rtol=1e-5, atol=1e-6)
    assert scaled.loss != plain.loss
    assert top_hooks == [] and top_scale == 1.0
    assert not any(isinstance(h, OutputRescaling) for layer in model.moe_layers for h in layer.hooks)


# ---------------------------------------------------------------------------------------- smoe-bias
def test_selection_bias_changes_the_selection_but_not_the_probabilities():
    """The bias enters the top-K only: probabilities and (softmax) gate values stay those of the raw scores."""
    layer = moe_from(dense_ffn(False))
    layer.set_top_k(2)
    layer.gate_mode = "softmax"
    layer.register_buffer("selection_bias", torch.zeros(E))
    layer.hooks = [SelectionBias()]
    x = torch.randn(1, 6, D, generator=torch.Generator().manual_seed(5))
    raw = torch.softmax(x[0] @ layer.router.weight.detach().T, -1)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])

    with torch.no_grad():
        layer(x)
        plain = layer.last_routing
        layer.selection_bias.copy_(bias)
        layer(x)
        biased = layer.last_routing

    assert not (plain.experts == 3).any(-1).all()  # without the bias expert 3 is not everyone's choice
    assert (biased.experts == 3).any(-1).all()  # with it, it is
    assert torch.equal(biased.experts, (biased.scores + bias).topk(2, -1).indices)
    torch.testing.assert_close(biased.probs, raw)
    assert torch.equal(biased.probs, plain.probs) and torch.equal(biased.logits, biased.scores)
    torch.testing.assert_close(biased.gates, raw.gather(1, biased.experts))


def test_selection_bias_update_over_two_rounds_by_hand(tiny_bert, tiny_task):
    """After every local step b_i += u sign(mean load - load_i), loads counted from the top-K of s + b on
    that step's batch; the server averages the clients' biases by data size; over two rounds of real
    local training the bias follows this hand computation."""
    exp = experiment(tiny_bert, tiny_task, "smoe-bias", "method.bias_rate=0.05")
    method, model = exp.method, exp.model
    state = method.initial_state(model)
    names = list(model.shared_buffers)
    assert len(names) == len(model.moe_layers)
    steps = []
    original = method.after_backward

    def recording(model_):
        steps.append([(layer.last_routing.scores.detach().clone(), layer.last_routing.experts.clone())
                      for layer in model_.moe_layers])
        original(model_)

    method.after_backward = recording
    total = sum(c.num_examples for c in exp.clients)
    history = []
    runtime = exp.client_runtime(None)
    for round_index in (1, 2):
        updates, hand = [], []
        for client in exp.clients:
            instruction = instruction_for(method, state, client, round_index)
            start = instruction.params
            steps.clear()
            updates.append(run_client(runtime, instruction))
            k = instruction.settings.top_k
            biases = {}
            for layer_index, name in enumerate(names):
                b = start[name].clone()
                for step in steps:
                    scores, experts = step[layer_index]
                    chosen = (scores + b).topk(k, -1).indices
                    assert torch.equal(chosen.sort(-1).values, experts.sort(-1).values)
                    load = torch.stack([(chosen == i).sum() for i in range(E)]).float()
                    b = b + 0.05 * torch.sign(load.mean() - load)
                biases[name] = b
            hand.append(biases)
        new = method.aggregate(state, updates)
        history.append((state, updates, hand, new))
        state = new

    for old, updates, hand, new in history:
        for name in names:
            for update, biases in zip(updates, hand):
                torch.testing.assert_close(old.params[name] + update.delta[name], biases[name], rtol=0, atol=1e-6)
            expected = sum(u.client.num_examples / total * biases[name] for u, biases in zip(updates, hand))
            torch.testing.assert_close(new.params[name], expected, rtol=0, atol=1e-6)
    assert any(state.params[name].abs().sum() > 0 for name in names)  # the K = 2 client moved it


# ---------------------------------------------------------------------------------------- smoe-aux
def test_switch_loss_gradient_reaches_the_router_as_the_hand_formula():
    """local_loss = coef * mean over layers of M sum_i f_i P_i: its gradient on each router weight equals
    autograd of that formula written by hand on the recorded routing (f from the recorded experts, P the
    mean softmax of x W_r^T), and is nonzero."""
    layers = [moe_from(dense_ffn(False), seed=s).double() for s in (0, 1)]
    for layer in layers:
        layer.set_top_k(2)  # f_i is a share of the 7 x 2 slots, not of the 7 tokens
    model = SimpleNamespace(moe_layers=layers, num_experts=E)
    method = SMoEAux(SMoEAuxOptions(aux_coef=0.3), k_max=E)
    x = torch.randn(1, 7, D, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for layer in layers:
        layer(x)
    weights = [layer.router.weight for layer in layers]

    loss = method.local_loss(model)
    grads = torch.autograd.grad(loss, weights)

    hand_terms = []
    for layer, w in zip(layers, weights):
        f = torch.stack([(layer.last_routing.experts == i).sum() for i in range(E)]).double() / (7 * 2)
        p = torch.softmax(x[0] @ w.T, -1).mean(0)
        hand_terms.append(E * (f * p).sum())
    hand = 0.3 * (hand_terms[0] + hand_terms[1]) / 2
    hand_grads = torch.autograd.grad(hand, weights)
    torch.testing.assert_close(loss, hand, rtol=1e-12, atol=0)
    for got, want in zip(grads, hand_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert got.abs().max() > 1e-4
