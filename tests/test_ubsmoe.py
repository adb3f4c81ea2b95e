"""UB-SMoE: DMR's server statistics and routing, the range regulariser, and the pseudo-gradient."""

import math

import pytest
import torch

from ubsmoe.config import ConfigError, load_config
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.methods.base import ClientInfo, ClientUpdate, RoutingStats, ServerState
from ubsmoe.methods.ubsmoe import UBSMoE, UBSMoEOptions, utilisation_target
from ubsmoe.model.moe_layer import GATE_MODES
from ubsmoe.model.modulated_routing import ModulatedRouting, attach_phi, range_penalty
from ubsmoe.model.pseudo_gradient import PseudoGradient, sparsity_factor

from tiny_experiment import tiny_overrides
from test_moe_layer import D, E, dense_ffn, moe_from


def test_server_statistics_and_phi_update_match_a_hand_computation():
    # Two clients, two layers, four experts. Client 0: K=2, 10 tokens; client 1: K=1, 30 tokens.
    routed = torch.tensor([[[10, 10, 0, 0], [5, 5, 5, 5]],
                           [[30, 0, 0, 0], [0, 10, 10, 10]]], dtype=torch.float64)
    tokens = torch.tensor([[10, 10], [30, 30]], dtype=torch.float64)
    usage, target = utilisation_target(routed, tokens, torch.tensor([2.0, 1.0]), eps=1e-6)
    # p = (0.25, 0.75); layer 0: u = 0.25*(1, 1, 0, 0) + 0.75*(1, 0, 0, 0) = (1, 0.25, 0, 0)
    # K_bar = 0.25*2 + 0.75*1 = 1.25, u* = 1.25 / 4 = 0.3125
    assert torch.allclose(usage[0], torch.tensor([1.0, 0.25, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(usage[1], torch.tensor([0.125, 0.375, 0.375, 0.375], dtype=torch.float64))
    expected = torch.tanh(0.3125 / (torch.tensor([1.0, 0.25, 0.0, 0.0], dtype=torch.float64) + 1e-6) - 1)
    assert torch.allclose(target[0], expected, atol=1e-9)
    assert target[0, 0] < 0 < target[0, 1] < target[0, 2]  # over-used pushed down, neglected pushed up

    method = UBSMoE(UBSMoEOptions(zeta=0.25), k_max=2)
    method.phi_names = ["phi0", "phi1"]
    state = ServerState({"phi0": torch.zeros(4), "phi1": torch.full((4,), 0.4)})
    # 3 examples and 1: the data weights (0.75, 0.25) are the reverse of the token shares (0.25, 0.75)
    updates = [ClientUpdate(ClientInfo(0, 1.0, 3), {"phi0": torch.full((4,), 0.2), "phi1": torch.zeros(4)},
                            RoutingStats(routed[0], tokens[0])),
               ClientUpdate(ClientInfo(1, 0.5, 1), {"phi0": torch.full((4,), -0.2), "phi1": torch.zeros(4)},
                            RoutingStats(routed[1], tokens[1]))]
    new = method.aggregate(state, updates)
    phi_bar0 = 0.25 * 0.2 + 0.75 * -0.2  # the token-weighted mean of the clients' phi (SPEC section 4)
    torch.testing.assert_close(new.params["phi0"], (0.25 * phi_bar0 + 0.75 * expected).float())
    torch.testing.assert_close(new.params["phi1"], (0.25 * 0.4 + 0.75 * target[1]).float())


def test_modulation_acts_only_inside_the_candidate_set():
    layer = moe_from(dense_ffn(False))
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    attach_phi(layer)
    layer.modulation.data = torch.tensor([0.0, 0.0, 0.0, 5.0])
    select, logits = ModulatedRouting(candidates=2).modulate(layer, scores, scores)
    assert torch.equal(select, scores)  # expert 3 is outside the top-2 candidates: no boost
    layer.modulation.data = torch.tensor([0.0, -2.0, 0.0, 5.0])
    select, logits = ModulatedRouting(candidates=2).modulate(layer, scores, scores)
    assert torch.equal(select, torch.tensor([[4.0, 1.0, 2.0, 1.0]]))
    assert torch.equal(logits, select)
    assert select.topk(2).indices.tolist() == [[0, 2]]  # the modulation changed the selection


def test_range_regulariser_value_and_gradient():
    phi = torch.tensor([-1.5, 0.0, 0.9, 2.0], requires_grad=True)
    value = range_penalty(phi, -1.0, 1.0)
    value.backward()
    assert value.item() == pytest.approx(0.5**2 + 1.0**2)
    assert phi.grad.tolist() == pytest.approx([-1.0, 0.0, 0.0, 2.0])


def gate_value(mode: str, probs: torch.Tensor, active: list[int], j: int) -> torch.Tensor:
    """w_j, the value expert j's output is multiplied by in the forward."""
    if mode == "straight_through":
        return torch.ones((), dtype=probs.dtype)
    if mode == "softmax_renorm":
        return probs[j] / probs[active].sum()
    return probs[j]


def brute_force_pseudo_gradients(layer, x, upstream, rho, modulation=None, candidates=None):
    """Per token, per active expert, the full gradient of its effective weight matrices as the layer runs
    it (gate included); then SPEC section 5's G_hat = sum_j (p_j / P) G_j / w_j and G_tilde, and the chain
    rule into the LoRA factors. x, upstream: (T, d) real tokens; ``modulation`` (E,) is added to the
    logits of each token's top-``candidates`` experts by raw score (DMR)."""
    s = layer.lora_scale
    names = ["up", "down"] + (["gate"] if layer.w_gate is not None else [])
    logits = layer.router(x).detach()
    if modulation is not None:
        inside = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, logits.topk(candidates, -1).indices, True)
        logits = logits + inside * modulation
    probs = torch.softmax(logits, -1)
    active = logits.topk(layer.top_k, -1).indices
    effective = {n: (getattr(layer, f"w_{n}") + s * getattr(layer, f"lora_{n}_a") @ getattr(layer, f"lora_{n}_b")).detach()
                 for n in names}
    g_tilde = {n: torch.zeros_like(effective[n]) for n in names}
    for t in range(x.shape[0]):
        g_hat = {n: 0 for n in names}
        chosen = active[t].tolist()
        mass = probs[t, chosen].sum()
        for j in chosen:
            w = {n: effective[n][j].clone().requires_grad_(True) for n in names}
            up = x[t] @ w["up"] + (layer.b_up[j] if layer.b_up is not None else 0)
            hidden = layer.activation(x[t] @ w["gate"]) * up if "gate" in w else layer.activation(up)
            gate = gate_value(layer.gate_mode, probs[t], chosen, j)
            out = (gate * hidden) @ w["down"]
            grads = torch.autograd.grad((out * upstream[t]).sum(), [w[n] for n in names])
            for n, g in zip(names, grads):
                g_hat[n] = g_hat[n] + (probs[t, j] / mass) * g / gate
        for i in range(layer.num_experts):
            if i not in chosen:
                for n in names:
                    g_tilde[n][i] += rho * probs[t, i] * g_hat[n]
    expected = {}
    for n in names:
        a, b = getattr(layer, f"lora_{n}_a").detach(), getattr(layer, f"lora_{n}_b").detach()
        expected[f"lora_{n}_a"] = s * g_tilde[n] @ b.transpose(1, 2)
        expected[f"lora_{n}_b"] = s * a.transpose(1, 2) @ g_tilde[n]
    return expected


def pseudo_gradient_of(layer, x, upstream, mask=None, hooks=()) -> tuple[dict, PseudoGradient]:
    """The LoRA factors' gradients with a PseudoGradient hook minus those without. x, upstream: (B, S, d)."""
    factors = {name: p for name, p in layer.named_parameters() if name.startswith("lora_")}
    layer.context.token_mask = mask

    def gradients(hook: PseudoGradient | None) -> dict[str, torch.Tensor]:
        layer.hooks = list(hooks) + ([hook] if hook else [])
        layer.zero_grad(set_to_none=True)
        (layer(x) * upstream).sum().backward()
        if hook:
            hook.apply(layer)
        return {name: p.grad.clone() for name, p in factors.items()}

    plain, hook = gradients(None), PseudoGradient(rho=0.7)
    with_pg = gradients(hook)
    return {name: with_pg[name] - plain[name] for name in factors}, hook


@pytest.mark.parametrize("gate_mode", GATE_MODES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_vectorised_pseudo_gradient_equals_brute_force(gated, k, gate_mode):
    """The gradients with the hook (its rows in the layer's backward, then ``apply``) minus those without,
    against SPEC section 5 computed token by token, under every gate mode."""
    layer = moe_from(dense_ffn(gated)).double()
    layer.gate_mode = gate_mode
    layer.set_top_k(k)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, D, generator=g, dtype=torch.float64)
    upstream = torch.randn(9, D, generator=g, dtype=torch.float64)

    added, hook = pseudo_gradient_of(layer, x.unsqueeze(0), upstream.unsqueeze(0))
    expected = brute_force_pseudo_gradients(layer, x, upstream, rho=0.7)

    assert set(expected) == set(added)
    for name in expected:
        torch.testing.assert_close(added[name], expected[name], rtol=1e-9, atol=1e-12)
    assert hook.compute(layer) == {}  # nothing left over once applied


def test_pseudo_gradient_under_modulated_routing_and_padding():
    """DMR changes the probabilities and the selection; padding tokens are neither routed nor counted."""
    layer = moe_from(dense_ffn(True)).double()
    layer.set_top_k(2)
    attach_phi(layer)
    layer.modulation.data = torch.tensor([0.8, -0.6, 0.3, -0.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, D, generator=g, dtype=torch.float64)
    upstream = torch.randn(2, 5, D, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)

    added, _ = pseudo_gradient_of(layer, x, upstream, mask, hooks=[ModulatedRouting(candidates=3)])
    expected = brute_force_pseudo_gradients(layer, x[mask], upstream[mask], rho=0.7,
                                            modulation=layer.modulation.detach(), candidates=3)
    unmodulated = brute_force_pseudo_gradients(layer, x[mask], upstream[mask], rho=0.7)

    for name in expected:
        torch.testing.assert_close(added[name], expected[name], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(added["lora_up_b"], unmodulated["lora_up_b"])  # DMR mattered here


def one_step_gradients(pg: bool, k: int):
    layer = moe_from(dense_ffn(False))
    layer.set_top_k(k)
    hook = PseudoGradient(rho=sparsity_factor("1-k/m", k, E, E))
    if pg:
        layer.hooks.append(hook)
    x = torch.randn(1, 3, D, generator=torch.Generator().manual_seed(7))  # 3 tokens x K=1: some experts idle
    layer(x).square().sum().backward()
    if pg:
        hook.apply(layer)
    active = set(layer.last_routing.experts.flatten().tolist())
    return layer, active


def test_pseudo_gradient_off_leaves_inactive_experts_exactly_zero():
    layer, active = one_step_gradients(pg=False, k=1)
    inactive = sorted(set(range(E)) - active)
    assert inactive
    for name in ("lora_up_a", "lora_up_b", "lora_down_a", "lora_down_b"):
        assert torch.count_nonzero(getattr(layer, name).grad[inactive]) == 0


def test_pseudo_gradient_on_reaches_every_expert_at_k_1():
    layer, active = one_step_gradients(pg=True, k=1)
    assert len(active) < E
    for name in ("lora_up_a", "lora_up_b", "lora_down_a", "lora_down_b"):
        grad = getattr(layer, name).grad
        assert all(grad[e].abs().sum() > 0 for e in range(E)), name


def test_rho_rules():
    assert sparsity_factor("1-k/m", 2, 8, 8) == 0.75
    assert sparsity_factor("m/k", 2, 8, 8) == 4.0
    assert sparsity_factor("kmax/k", 2, 6, 8) == 3.0
    with pytest.raises(ValueError, match="unknown rho rule"):
        sparsity_factor("k", 2, 8, 8)


@pytest.mark.parametrize("pg", [True, False])
def test_ubsmoe_end_to_end_reaches_every_expert_only_with_the_pseudo_gradient(tiny_bert, tiny_task, pg):
    """No client runs K = M (every client K = 1 of 8, one short text per step), so without the pseudo-gradient
    some (layer, expert) pairs get no update; with it none is left out. phi moves away from zero."""
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{
        "model.num_experts": 8, "federation.budgets": "0.125", "federation.rounds": 1, "train.local_steps": 1,
        "train.batch_size": 1}) + [f"method.pg={str(pg).lower()}"], method="ubsmoe")

    results = run_experiment(config, show_progress=False)

    balance = results.final.balance
    assert results.k_max == 8 and results.tiers == [0.125]  # K = 1: no client runs every expert
    if pg:
        assert balance.experts_without_update == 0.0
    else:
        assert balance.experts_without_update > 0.1
    phi = torch.tensor(results.final.server["phi"])
    assert phi.shape == (2, 8) and phi.abs().min() > 0 and phi.abs().max() <= 1
    assert len(balance.train.cv) == 2 and 0 <= balance.tiers["0.125"].mean_entropy <= 1


@pytest.mark.parametrize("gate_mode", GATE_MODES)
def test_ubsmoe_runs_under_every_gate_mode(tiny_bert, tiny_task, gate_mode):
    """model.gate_mode reaches every layer, DMR and the pseudo-gradient train under it, and it changes the numbers."""
    overrides = tiny_overrides(tiny_bert, tiny_task, **{"federation.budgets": "0.25,0.5", "federation.rounds": 1})

    experiment = build_experiment(load_config(overrides=overrides + [f"model.gate_mode={gate_mode}"], method="ubsmoe"))
    results = run_experiment(load_config(overrides=overrides + [f"model.gate_mode={gate_mode}"], method="ubsmoe"),
                             show_progress=False)
    reference = run_experiment(load_config(overrides=overrides, method="ubsmoe"), show_progress=False)

    assert {layer.gate_mode for layer in experiment.model.moe_layers} == {gate_mode}
    assert results.config["model"]["gate_mode"] == gate_mode
    assert results.final.balance.experts_without_update == 0.0
    assert torch.tensor(results.final.server["phi"]).abs().min() > 0
    losses = [c.train_loss for c in results.history[-1].clients]
    reference_losses = [c.train_loss for c in reference.history[-1].clients]
    assert all(math.isfinite(v) for v in losses)
    assert (losses == reference_losses) == (gate_mode == "straight_through")


def test_unknown_gate_mode_is_refused(tiny_bert, tiny_task):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task) + ["model.gate_mode=sigmoid"], method="ubsmoe")
    with pytest.raises(ConfigError, match="model.gate_mode must be one of straight_through, softmax, softmax_renorm"):
        run_experiment(config, show_progress=False)


def test_candidate_set_outside_its_range_is_refused(tiny_bert, tiny_task):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task) + ["method.candidates=9"], method="ubsmoe")
    with pytest.raises(ValueError, match=r"method.candidates must lie in \[K_max=4, M=4\]"):
        run_experiment(config, show_progress=False)


def test_the_range_regulariser_pulls_phi_back_where_it_leaves_its_range(tiny_bert, tiny_task):
    """At the defaults phi stays inside [-1, 1] and the regulariser never acts (phi_range=false gives the same
    numbers); with a narrow range and a strong weight it does, and phi ends closer to the range."""
    def final_phi(**options):
        overrides = tiny_overrides(tiny_bert, tiny_task, **{"federation.rounds": 2, "train.lr": 0.05}
                                   | {f"method.{k}": v for k, v in options.items()})
        results = run_experiment(load_config(overrides=overrides, method="ubsmoe"), show_progress=False)
        return torch.tensor(results.final.server["phi"])

    narrow = {"phi_min": -0.05, "phi_max": 0.05, "phi_range_weight": 50.0, "zeta": 1.0}
    regularised, free = final_phi(**narrow), final_phi(**narrow, phi_range=False)
    outside = lambda phi: (phi.abs() - 0.05).clamp_min(0).sum()  # noqa: E731

    assert not torch.equal(regularised, free)
    assert outside(regularised) < outside(free)
    assert torch.equal(final_phi(), final_phi(phi_range=False))  # the defaults: the regulariser never acts
