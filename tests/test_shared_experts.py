"""Shared experts in upcycling (``model.shared_experts``): the most important neurons always on, K_c counting
them, every routing mechanism on the routed experts only, and K = M still the dense model."""

import pytest
import torch
import torch.nn.functional as F

from test_upcycle import assert_equals_dense
from tiny_experiment import tiny_overrides
from ubsmoe.cli import main
from ubsmoe.config import load_config
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.model import ModelSpec, build_model, load_tokenizer
from ubsmoe.model.pretrained import load_dense_backbone
from ubsmoe.model.shared_expert import UpcycledSharedMoE
from ubsmoe.model.upcycle import DenseFFN, neuron_importance, split_shared
from ubsmoe.tasks.classification import classification_head


def test_the_shared_part_holds_the_neurons_that_add_most_to_the_output():
    """8 neurons; on these inputs neurons 5 and 2 fire strongest and have the largest output rows."""
    d, h = 4, 8
    w_up = torch.zeros(d, h)
    w_up[0] = torch.tensor([0.1, 0.2, 3.0, 0.1, 0.3, 2.0, 0.2, 0.1])  # what input 0 drives each neuron by
    w_down = torch.ones(h, d)
    w_down[5] *= 4.0  # neuron 5: 2.0 activation x norm 8 = 16; neuron 2: 3.0 x 2 = 6; the rest below 1
    ffn = DenseFFN(w_up, w_down, F.relu, b_down=torch.ones(d))
    x = torch.tensor([[1.0, 0, 0, 0], [2.0, 0, 0, 0]])

    shared, routed = split_shared(ffn, x, num_experts=4, shared=1)

    assert neuron_importance(ffn, x).argsort(descending=True)[:2].tolist() == [5, 2]
    torch.testing.assert_close(shared.w_up, w_up[:, [2, 5]])  # the 2 = S h / M most important, in order
    torch.testing.assert_close(routed.w_down, w_down[[0, 1, 3, 4, 6, 7]])
    assert shared.b_down is ffn.b_down and routed.b_down is None
    torch.testing.assert_close(shared(x) + routed(x), ffn(x))  # nothing lost, b_down added once


def batches(path):
    tokenizer = load_tokenizer(path)
    enc = tokenizer(["the bank rates market", "a film star show music award win"], padding=True, return_tensors="pt")
    return enc, [(enc["input_ids"], enc["attention_mask"])]


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_llama"])
@pytest.mark.parametrize("shared", [1, 2])
def test_k_equal_m_with_shared_experts_is_the_dense_backbone(backbone, shared, request):
    path = str(request.getfixturevalue(backbone))
    enc, calibration = batches(path)
    model = build_model(ModelSpec(backbone=path, num_experts=4, lora_rank=4, shared_experts=shared),
                        classification_head(3), calibration_batches=calibration)
    model.set_top_k(4 - shared)  # every routed expert, beside the shared ones

    assert_equals_dense(model, path, enc)
    assert model.num_experts == 4 - shared and len(model.shared_layers) == 2
    assert all(isinstance(block.mlp if hasattr(block, "mlp") else block.output.dense, UpcycledSharedMoE)
               for block in model.family.layers(model.backbone))
    matrices = 3 if backbone == "tiny_llama" else 2  # gate, up, down / up, down
    assert model.parameter_report()["shared_expert_lora"] == 2 * matrices * 4 * (32 + 16 * shared)  # 2 layers, r 4
    model.set_top_k(0)  # K_c = S: the shared part alone, no routing recorded
    with torch.no_grad():
        model(enc["input_ids"], enc["attention_mask"])
    assert all(layer.last_routing is None for layer in model.moe_layers)


def shared_config(tiny_bert, tiny_task, method="ubsmoe", **extra):
    return load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{
        "model.shared_experts": 1, "federation.budgets": "0.5,1.0", "federation.rounds": 1} | extra), method=method)


def test_a_tier_runs_k_c_experts_counting_the_shared_one(tiny_bert, tiny_task):
    """M = 4, S = 1: beta 0.5 gives K_c = 2, one shared and one routed expert; beta 1 all three routed."""
    exp = build_experiment(shared_config(tiny_bert, tiny_task))

    assert (exp.method.k_max, exp.method.shared_experts) == (3, 1)
    assert [exp.method.top_k(b) for b in (0.5, 1.0)] == [1, 3]
    assert exp.model.routing_counts()[0].shape == (2, 3)  # routing statistics cover the routed experts only
    assert set(exp.model.expert_tensors()) == {n for n in exp.model.trainable_state()
                                                 if ".lora_" in n and "shared" not in n and ("mlp" in n or "output.dense" in n)
                                                 and "attention" not in n}


def test_routing_mechanisms_see_only_the_routed_experts_and_the_shared_part_trains(tiny_bert, tiny_task):
    results = run_experiment(shared_config(tiny_bert, tiny_task), show_progress=False)

    final = results.final
    assert [len(layer) for load in final.tier_expert_load.values() for layer in load] == [3] * 4
    assert [len(phi) for phi in final.server["phi"]] == [3, 3]  # DMR's phi over the routed experts
    assert results.parameters["shared_expert_lora"] > 0
    assert [c.id for c in results.history[-1].clients] == [0, 1]  # both clients answered


def test_a_budget_below_the_shared_experts_is_refused_before_loading(tiny_bert, tiny_task, tmp_path, capsys):
    code = main(["run", "--quiet", "--out", str(tmp_path / "o")] + tiny_overrides(
        tiny_bert, tiny_task, **{"model.shared_experts": 2, "federation.budgets": "0.25,1.0"}))

    assert code == 2
    assert "budget 0.25 gives K_c = 1 experts, fewer than the 2 shared ones" in capsys.readouterr().err


def test_shared_experts_do_not_change_a_run_without_them(tiny_bert, tiny_task):
    """S = 0 is today's model: the same trainable tensors, bit for bit (the reference numbers test the rest)."""
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task))
    zero = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{"model.shared_experts": 0}))

    a, b = build_experiment(config).model.trainable_state(), build_experiment(zero).model.trainable_state()

    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any("shared" in k for k in a)


def test_the_fidelity_bench_measures_no_layer_error_at_k_equal_m(tiny_llama):
    """The per-layer error hooks of ``bench upcycle``: 0 where the upcycled FFN is the dense one (K = M),
    above 0 where experts are left out."""
    from ubsmoe.bench.upcycle_fidelity import LayerErrors, ffn_modules

    path = str(tiny_llama)
    enc, calibration = batches(path)
    model = build_model(ModelSpec(backbone=path, num_experts=4, lora_rank=4, shared_experts=1),
                        classification_head(3), calibration_batches=calibration)
    dense, family = load_dense_backbone(path)
    errors = LayerErrors(ffn_modules(model.backbone, family), [family.extract_ffn(l) for l in family.layers(dense)],
                         model.context)
    measured = {}
    for k in (3, 1):
        model.set_top_k(k)
        errors.reset()
        with torch.no_grad():
            model.hidden_states(enc["input_ids"], enc["attention_mask"])
        measured[k] = errors.relative()

    assert max(measured[3]) < 1e-5
    assert min(measured[1]) > 1e-3


def test_the_pg_fidelity_bench_finds_the_exact_direction_where_every_expert_is_the_same(tiny_llama):
    """Identical experts and router rows: every token has p_i = 1/E and every expert's true gradient equals
    the active ones', so the pseudo-gradient points exactly the same way (cosine 1), at rho / E of its norm."""
    from ubsmoe.bench.pg_fidelity import lm_loss, measure

    path = str(tiny_llama)
    enc, calibration = batches(path)
    model = build_model(ModelSpec(backbone=path, num_experts=4, lora_rank=4, router_init="centroid"),
                        classification_head(3))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.moe_layers:
            for name, p in layer.named_parameters():
                if name.startswith(("w_", "lora_")) or name == "router.weight":
                    first = p[0].clone() if name != "router.weight" else p[0].clone()
                    if name.startswith("lora_") and name.endswith("_b"):
                        first = torch.randn(first.shape, generator=generator) * 0.05
                    p.copy_(first.expand_as(p))
            for name in ("w_up", "w_gate", "w_down"):
                getattr(layer, name).copy_(getattr(layer, name)[0].expand_as(getattr(layer, name)))

    rows = measure(model, lm_loss(enc["input_ids"], enc["attention_mask"]), k=1, draw_b=False)

    assert rows and all(r["cosine"] == pytest.approx(1.0, abs=1e-4) for r in rows)
    assert all(r["norm_ratio"] == pytest.approx((1 - 1 / 4) / 4, rel=1e-3) for r in rows)


def test_the_default_is_the_backbones_measured_one_and_older_runs_had_none():
    from ubsmoe.config import ExperimentConfig, config_from_dict, differing_keys
    from ubsmoe.model.backbones import default_shared_experts

    assert [default_shared_experts(name, -1) for name in ("smollm2", "minilm", "/models/llama")] == [1, 0, 0]
    assert default_shared_experts("smollm2", 0) == 0
    older = ExperimentConfig().to_dict()
    del older["model"]["shared_experts"]  # a run written before the key: it had no shared experts
    assert config_from_dict(older).model.shared_experts == 0
    assert differing_keys(older, config_from_dict(older)) == []
    assert differing_keys(older, ExperimentConfig()) == ["model.shared_experts"]


def test_dmr_leaves_phi_alone_in_a_round_no_client_routed_through():
    """Clients at K_c = S route nothing: no utilisation statistics, so phi keeps its data-weighted mean (no
    0 / 0 reaching the model)."""
    from ubsmoe.methods.base import ClientInfo, ClientUpdate, RoutingStats, ServerState
    from ubsmoe.methods.ubsmoe import UBSMoE, UBSMoEOptions

    method = UBSMoE(UBSMoEOptions(), k_max=3)
    method.shared_experts, method.phi_names = 1, ["phi0"]
    state = ServerState({"phi0": torch.tensor([0.1, 0.2, 0.3])})
    idle = RoutingStats(torch.zeros(1, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    updates = [ClientUpdate(ClientInfo(c, 0.25, 4), {"phi0": torch.full((3,), 0.1 * c)}, idle) for c in range(2)]

    new = method.aggregate(state, updates)

    torch.testing.assert_close(new.params["phi0"], torch.tensor([0.15, 0.25, 0.35]))
    assert torch.isfinite(new.method.phi_target).all()
