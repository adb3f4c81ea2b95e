"""The baselines against hand computations on tiny matrices, and each end to end on a tiny backbone."""

import math

import numpy as np
import pytest
import torch

from tiny_experiment import assert_every_client_answered, tiny_overrides
from ubsmoe.config import load_config
from ubsmoe.engine.client_round import run_client
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.engine.server import instruction_for
from ubsmoe.methods.a3smoe import activation_weights
from ubsmoe.methods.base import ClientInfo, ClientUpdate, FederatedMethod, RoutingStats, ServerState
from ubsmoe.methods import REGISTRY
from ubsmoe.methods.default_moe import DefaultMoE, DefaultMoEOptions, DefaultOutputs
from ubsmoe.methods.flexlora import FlexLoRA
from ubsmoe.methods.florist import energy_rank, thresholded_pair
from ubsmoe.methods.flora import stack_factors
from ubsmoe.methods.hetlora import HetLoRA, HetLoRAOptions, NextRank, next_rank, tail_norm
from ubsmoe.methods.low_rank import Adapter, factors_from_svd, truncated
from ubsmoe.methods.smoe_aux import switch_balance_loss
from ubsmoe.methods.smoe_bias import bias_step
from ubsmoe.model.moe_layer import RoutingRecord
from ubsmoe.methods.default_moe import UpdatedDefaults
from ubsmoe.methods.flexlora import TrainedFactors
from ubsmoe.methods.records import NoRecord

from test_moe_layer import dense_ffn, moe_from

G = torch.Generator().manual_seed(0)
ADAPTER = Adapter("m.lora_a", "m.lora_b", scale=2.0, base="linear", weight="m.base.weight")


def rand(*shape):
    return torch.randn(*shape, generator=G, dtype=torch.float64)


def update(client_id, n, delta, budget=1.0, extras=None):
    return ClientUpdate(ClientInfo(client_id, budget, n), delta, extras=extras or NoRecord())


# ---------------------------------------------------------------------------------------- HetLoRA
def test_hetlora_pads_truncates_and_averages_by_update_norm():
    global_a, global_b = rand(5, 4), rand(4, 3)
    head = rand(2)
    state = ServerState({"m.lora_a": global_a, "m.lora_b": global_b, "head.bias": head}, HetLoRA.State())
    trained = [(rand(5, 4), rand(4, 3)), (rand(5, 4), rand(4, 3))]
    ranks, sizes = [2, 4], [30, 10]
    # the deltas travel at each client's rank (r_max = 4: budgets 0.5 and 1.0)
    updates = [update(i, n, {"m.lora_a": (a - global_a)[:, :r], "m.lora_b": (b - global_b)[:r],
                             "head.bias": torch.full((2,), i + 1.0)}, budget=r / 4, extras=NextRank())
               for i, ((a, b), r, n) in enumerate(zip(trained, ranks, sizes))]
    method = HetLoRA(HetLoRAOptions(prune_lambda=0.0), k_max=1)
    method.adapters, method.r_max = [ADAPTER], 4

    new = method.aggregate(state, updates).params

    # by hand: client 0 keeps ranks 0..1 and pads 2..3 with zeros; weights are ||2 a_k b_k||_F
    pa0, pb0 = trained[0][0].clone(), trained[0][1].clone()
    pa0[:, 2:] = 0
    pb0[2:] = 0
    pa1, pb1 = trained[1]
    w0, w1 = (2 * pa0 @ pb0).norm().item(), (2 * pa1 @ pb1).norm().item()
    assert torch.allclose(new["m.lora_a"], (w0 * pa0 + w1 * pa1) / (w0 + w1))
    assert torch.allclose(new["m.lora_b"], (w0 * pb0 + w1 * pb1) / (w0 + w1))
    assert torch.allclose(new["head.bias"], head + (30 * 1.0 + 10 * 2.0) / 40)  # the head: FedAvg by data size
    # truncation for a rank-2 client: first two ranks kept, the rest zero
    a, b = truncated(new, ADAPTER, 2)
    assert torch.equal(a[:, :2], new["m.lora_a"][:, :2]) and a[:, 2:].abs().sum() == 0 and b[2:].abs().sum() == 0


def test_hetlora_tail_norm_equals_the_product_norm():
    a, b = rand(2, 6, 5), rand(2, 5, 7)  # two stacked experts
    expected = sum((a[e, :, 3:5] @ b[e, 3:5]).norm() for e in range(2))
    assert torch.allclose(tail_norm(a, b, 3, 5), expected)


def test_hetlora_self_pruning_rule():
    assert next_rank(8, 0.99, tail_before=2.0, tail_after=1.0) == 7  # the tail shrank: prune
    assert next_rank(8, 0.5, tail_before=2.0, tail_after=1.0) == 4
    assert next_rank(8, 0.5, tail_before=1.0, tail_after=2.0) == 8  # it grew: keep
    assert next_rank(1, 0.5, tail_before=2.0, tail_after=1.0) == 1  # never below one


def test_hetlora_client_ranks_follow_their_budgets_and_only_shrink(tiny_bert, tiny_task):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{"federation.rounds": 3})
                         + ["method.prune_lambda=0.5", "method.prune_gamma=0.5"], method="hetlora")
    results = run_experiment(config, show_progress=False)
    # r_max = 4: client 0 (beta = 0.5) starts at rank 2, client 1 (beta = 1) at rank 4; each round a
    # client either keeps its rank or halves it
    reachable = {0: {2, 1}, 1: {4, 2, 1}}
    previous = {0: 2, 1: 4}
    for entry in results.history:
        ranks = {int(k): v for k, v in entry.server["client_ranks"].items()}
        for client, rank in ranks.items():
            assert rank in reachable[client] and rank in (previous[client], max(1, previous[client] // 2))
            previous[client] = rank
    assert set(results.final.tier_accuracy) == {"0.5", "1.0"}


# ---------------------------------------------------------------------------------------- FlexLoRA
def test_flexlora_averages_products_and_full_rank_svd_reproduces_them():
    trained = [(rand(6, 5), rand(5, 5)) for _ in range(3)]
    products = [2.0 * a @ b for a, b in trained]  # ADAPTER.scale = 2
    sizes = [10, 20, 30]
    method = FlexLoRA(None, k_max=1)
    method.adapters = [ADAPTER]
    method.r_max = 5
    state = ServerState({"m.lora_a": rand(6, 5), "m.lora_b": rand(5, 5)})
    updates = [ClientUpdate(ClientInfo(i, 1.0, n), {}, extras=TrainedFactors({"m.lora_a": a, "m.lora_b": b}))  # trained factors
               for i, ((a, b), n) in enumerate(zip(trained, sizes))]

    new = method.aggregate(state, updates)

    expected = (10 * products[0] + 20 * products[1] + 30 * products[2]) / 60
    full = method._params_at_rank(new, 5)  # rank 5 = full rank of a 6 x 5 update
    assert torch.allclose(ADAPTER.product(full), expected)
    low = method._params_at_rank(new, 2)  # rank 2: the best rank-2 approximation (Eckart-Young)
    s = torch.linalg.svdvals(expected)
    assert torch.allclose((ADAPTER.product(low) - expected).norm(), s[2:].square().sum().sqrt())


def test_svd_factors_are_zero_padded_to_r_max():
    a, b = factors_from_svd(torch.linalg.svd(rand(6, 5), full_matrices=False), rank=2, r_max=4, scale=0.5)
    assert a.shape == (6, 4) and b.shape == (4, 5)
    assert a[:, 2:].abs().sum() == 0 and b[2:].abs().sum() == 0


# ---------------------------------------------------------------------------------------- FLoRA
def test_flora_stacking_is_the_exact_weighted_sum_of_products():
    factors = [(rand(6, 2), rand(2, 5)), (rand(6, 4), rand(4, 5)), (rand(6, 1), rand(1, 5))]
    sizes = [10, 30, 60]
    stacked_a, stacked_b = stack_factors(factors, sizes)
    assert stacked_a.shape == (6, 7) and stacked_b.shape == (7, 5)
    expected = 0.1 * factors[0][0] @ factors[0][1] + 0.3 * factors[1][0] @ factors[1][1] + 0.6 * factors[2][0] @ factors[2][1]
    assert torch.allclose(stacked_a @ stacked_b, expected)


def test_flora_merges_the_weighted_update_into_the_base_and_restarts_fresh_adapters(tiny_bert, tiny_task):
    exp = build_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method="flora"))
    method, model = exp.method, exp.model
    state = method.initial_state(model)
    adapter = method.adapters[0]
    weight_before = dict(model.named_parameters())[adapter.weight].detach().clone()
    clients = [ClientInfo(0, 0.5, 10), ClientInfo(1, 1.0, 30)]  # r_max = 4: ranks 2 and 4
    trained, updates = [], []
    for client in clients:
        sent = method.client_params(state, client)  # the adapters at the client's rank
        delta = {n: torch.randn(v.shape, generator=G) * 0.1 for n, v in sent.items()}
        updates.append(ClientUpdate(client, delta))
        trained.append({n: sent[n] + delta[n] for n in (adapter.a, adapter.b)})

    new = method.aggregate(state, updates)
    assert torch.equal(dict(model.named_parameters())[adapter.weight], weight_before)  # merged where it is synced
    method.sync_frozen(model, method.frozen_state(new))
    method.sync_frozen(model, method.frozen_state(new))  # once only

    expected = sum(p * adapter.scale * trained[i][adapter.a][:, :r] @ trained[i][adapter.b][:r]
                   for i, (p, r) in enumerate([(0.25, 2), (0.75, 4)]))
    weight_after = dict(model.named_parameters())[adapter.weight].detach()
    assert torch.allclose(weight_after - weight_before, expected.T, atol=1e-6)  # nn.Linear stores (out, in)
    assert torch.equal(new.params[adapter.b], state.params[adapter.b])  # fresh adapters (b = 0) next round
    assert new.params[adapter.b].abs().sum() == 0


# ---------------------------------------------------------------------------------------- FLoRIST
@pytest.mark.parametrize("tau", [0.5, 0.8, 0.95, 1.0])
def test_florist_rank_meets_the_energy_threshold_and_error_matches_dropped_values(tau):
    factors = [(rand(12, 3), rand(3, 9)), (rand(12, 2), rand(2, 9))]
    stacked_a, stacked_b = stack_factors(factors, [1, 3])
    global_a, global_b, s = thresholded_pair(stacked_a, stacked_b, tau)
    rank = global_a.shape[1]
    energy = s.square() / s.square().sum()
    assert energy[:rank].sum() >= tau - 1e-9  # enough energy kept ...
    assert rank == 1 or energy[: rank - 1].sum() < tau  # ... with the fewest singular values
    assert torch.allclose(s, torch.linalg.svdvals(stacked_a @ stacked_b)[: len(s)])  # small-space SVD is exact
    error = (stacked_a @ stacked_b - global_a @ global_b).norm()
    assert torch.allclose(error, s[rank:].square().sum().sqrt(), atol=1e-9)


def test_energy_rank_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14: cumulative 0.643, 0.929, 1
    assert [energy_rank(s, t) for t in (0.5, 0.643, 0.9, 0.93, 1.0)] == [1, 2, 2, 3, 3]


# ---------------------------------------------------------------------------------------- SMoE-LLB
def test_switch_auxiliary_loss_on_a_known_routing():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.4, 0.4, 0.2]])
    experts = torch.tensor([[0], [1], [0], [0]])  # f = (3/4, 1/4, 0)
    record = RoutingRecord(probs.log(), probs.log(), probs, experts, torch.ones(4, 1))
    p = probs.mean(0)  # (0.425, 0.3625, 0.2125)
    expected = 3 * (0.75 * p[0] + 0.25 * p[1])
    assert torch.allclose(switch_balance_loss(record, 3), expected)
    uniform = RoutingRecord(probs, probs, torch.full((4, 4), 0.25), torch.tensor([[0], [1], [2], [3]]), torch.ones(4, 1))
    assert torch.allclose(switch_balance_loss(uniform, 4), torch.tensor(1.0))  # the balanced minimum


def test_selection_bias_moves_towards_balance():
    bias = torch.zeros(4)
    experts = torch.tensor([[0, 1], [0, 1], [0, 2], [0, 1]])  # loads 4, 3, 1, 0; mean 2
    new = bias_step(bias, experts, 0.01)
    assert torch.equal(new, torch.tensor([-0.01, -0.01, 0.01, 0.01]))
    balanced = bias_step(bias, torch.tensor([[0, 1], [2, 3]]), 0.01)
    assert torch.equal(balanced, bias)


# ---------------------------------------------------------------------------------------- A3SMoE
def test_a3smoe_weights_by_hand_and_fedavg_at_zero_temperature():
    routed = torch.tensor([[[8.0, 2.0, 0.0]], [[1.0, 1.0, 0.0]]], dtype=torch.float64)  # (C=2, L=1, E=3)
    tokens = torch.tensor([[10.0], [2.0]], dtype=torch.float64)
    sizes = torch.tensor([30.0, 10.0], dtype=torch.float64)
    w = activation_weights(routed, tokens, sizes, 1.0)
    # expert 0: shares 0.8 and 0.5 -> 24 : 5; expert 1: 0.2, 0.5 -> 6 : 5; expert 2: nobody -> data sizes
    assert torch.allclose(w[:, 0, 0], torch.tensor([24 / 29, 5 / 29], dtype=torch.float64))
    assert torch.allclose(w[:, 0, 1], torch.tensor([6 / 11, 5 / 11], dtype=torch.float64))
    assert torch.allclose(w[:, 0, 2], torch.tensor([0.75, 0.25], dtype=torch.float64))
    assert torch.allclose(activation_weights(routed, tokens, sizes, 0.0)[:, 0], torch.tensor([[0.75] * 3, [0.25] * 3],
                                                                                           dtype=torch.float64))


def test_a3smoe_at_zero_temperature_aggregates_like_fedavg(tiny_bert, tiny_task):
    exp = build_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task) + ["method.temperature=0"],
                                       method="a3smoe"))
    method, model = exp.method, exp.model
    state = method.initial_state(model)
    updates = []
    for i, (budget, n) in enumerate([(0.5, 10), (1.0, 30)]):
        delta = {k: torch.randn(v.shape, generator=G) for k, v in state.params.items()}
        routed = torch.rand(len(model.moe_layers), model.num_experts, generator=G) * 10
        updates.append(ClientUpdate(ClientInfo(i, budget, n), delta, RoutingStats(routed.double(), torch.full(
            (len(model.moe_layers),), 10.0, dtype=torch.float64))))

    ours = method.aggregate(state, updates).params
    fedavg = FederatedMethod.aggregate(method, state, updates).params

    for name in ours:
        if name not in method.scale_names:
            assert torch.allclose(ours[name], fedavg[name], atol=1e-6), name


# ---------------------------------------------------------------------------------------- Default MoE
def test_default_moe_moving_average_and_no_gradient_for_inactive_experts():
    torch.manual_seed(0)
    layer = moe_from(dense_ffn(gated=False), num_experts=4, rank=2)
    layer.set_top_k(1)
    layer.register_buffer("expert_defaults", torch.randn(4, layer.d_model))
    layer.register_buffer("expert_defaults_seen", torch.tensor([1.0, 1.0, 0.0, 0.0]))  # 2 and 3: no mean yet
    before = layer.expert_defaults.clone()
    hook = DefaultOutputs(decay=0.9, update=True)
    layer.hooks = [hook]
    layer.train()
    x = torch.randn(1, 6, layer.d_model)

    out = layer(x)
    record = layer.last_routing

    # by hand: the mean output of each expert over its tokens, computed one expert at a time
    down = layer.w_down + layer.lora_scale * layer.lora_down_a @ layer.lora_down_b
    up = layer.w_up + layer.lora_scale * layer.lora_up_a @ layer.lora_up_b
    flat = x[0]
    for e in range(4):
        mine = (record.experts[:, 0] == e).nonzero().squeeze(1)
        if len(mine) == 0:
            assert torch.equal(layer.expert_defaults[e], before[e])
            continue
        outputs = layer.activation(flat[mine] @ up[e] + layer.b_up[e]) @ down[e]
        # an expert's first mean is its default as it is (no bias towards the zero it started from)
        expected = 0.9 * before[e] + 0.1 * outputs.mean(0) if e < 2 else outputs.mean(0)
        assert torch.allclose(layer.expert_defaults[e], expected, atol=1e-5)
        assert layer.expert_defaults_seen[e] == 1
    # the forward adds every inactive expert's default (straight-through gate: value 1)
    hook.update = False
    layer.hooks = []
    plain = layer(x)
    layer.hooks = [hook]
    inactive = torch.ones(6, 4, dtype=torch.bool).scatter_(1, record.experts, False)
    assert torch.allclose(out[0] - plain[0], inactive.float() @ layer.expert_defaults, atol=1e-5)
    # backward: the router gets a gradient for every expert, inactive experts' LoRA none
    out.sum().backward()
    assert (layer.router.weight.grad.abs().sum(1) > 0).all()
    used = set(record.experts.reshape(-1).tolist())
    for e in range(4):
        grad = layer.lora_up_a.grad[e].abs().sum()
        assert (grad > 0) if e in used else (grad == 0), e
    assert len(used) < 4  # the check above covered an inactive expert


def test_default_moe_averages_each_default_over_the_clients_that_updated_it():
    """Regression: a client at K = M (dense path) uploaded a zero change for every default, which FedAvg
    averaged in, halving the others' moves."""
    method = DefaultMoE(DefaultMoEOptions(), k_max=4)
    method.default_names, method.seen_names = ["d0"], ["s0"]
    state = ServerState({"d0": torch.zeros(4, 2), "s0": torch.tensor([0.0, 1.0, 0.0, 0.0]), "w": torch.zeros(1)})
    moved = torch.tensor([[1.0, 1.0], [0.0, 0.0], [2.0, 2.0], [0.0, 0.0]])
    updates = [
        ClientUpdate(ClientInfo(0, 1.0, 10), {"d0": torch.zeros(4, 2), "s0": torch.zeros(4), "w": torch.ones(1)},
                     extras=UpdatedDefaults(torch.zeros(1, 4, dtype=torch.bool))),  # K = M: updated none
        ClientUpdate(ClientInfo(1, 0.25, 30), {"d0": moved, "s0": torch.tensor([1.0, 0, 1, 0]), "w": torch.zeros(1)},
                     extras=UpdatedDefaults(torch.tensor([[True, False, True, False]]))),
        ClientUpdate(ClientInfo(2, 0.5, 60), {"d0": torch.full((4, 2), 4.0) * torch.tensor([[1], [0], [0], [0]]),
                                              "s0": torch.tensor([1.0, 0, 0, 0]), "w": torch.zeros(1)},
                     extras=UpdatedDefaults(torch.tensor([[True, False, False, False]]))),
    ]

    new = method.aggregate(state, updates).params

    expected = torch.tensor([[(30 * 1 + 60 * 4) / 90] * 2, [0, 0], [2, 2], [0, 0]])
    torch.testing.assert_close(new["d0"], expected)
    torch.testing.assert_close(new["s0"], torch.tensor([1.0, 1.0, 1.0, 0.0]))  # a default once set stays set
    torch.testing.assert_close(new["w"], torch.tensor([0.1]))  # everything else stays FedAvg


def test_default_moe_clients_report_which_defaults_they_updated(tiny_bert, tiny_task):
    """A K = M client updates no default; a K < M client those of the experts it routed tokens to."""
    exp = build_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method="default-moe"))
    state = exp.method.initial_state(exp.model)
    runtime = exp.client_runtime(None)
    reports = {client.budget: run_client(runtime, instruction_for(exp.method, state, client, 1))
               for client in exp.clients}  # budgets 0.5 (K = 2 of 4) and 1.0 (K = M)

    dense, sparse = reports[1.0], reports[0.5]
    assert not dense.extras.defaults_updated.any()
    assert torch.equal(sparse.extras.defaults_updated, sparse.routing.routed > 0)
    for index, name in enumerate(exp.method.default_names):
        changed = sparse.delta[name].ne(0).any(1)
        assert torch.equal(changed, sparse.extras.defaults_updated[index])


# ---------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_runs_end_to_end(tiny_bert, tiny_task, method):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method=method)
    results = run_experiment(config, show_progress=False)
    final = results.final
    assert set(final.tier_accuracy) == {"0.5", "1.0"}
    assert all(a * results.num_test == pytest.approx(round(a * results.num_test))
               for a in final.tier_accuracy.values())  # shares of the test texts
    assert math.isfinite(final.test_loss)
    assert all(np.isfinite(c.train_loss) for h in results.history for c in h.clients)
    assert_every_client_answered(results)


def test_heterogeneous_rank_methods_see_every_adapter(tiny_bert, tiny_task):
    exp = build_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method="hetlora"))
    exp.method.initial_state(exp.model)
    names = exp.method.adapter_names()
    lora = {n for n, p in exp.model.named_parameters() if p.requires_grad and "lora" in n}
    assert names == lora and len(lora) == 2 * 2 * 4  # 2 layers x (query, value, FFN up, FFN down) x (a, b)
