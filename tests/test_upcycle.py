"""Upcycling: balanced neuron clustering, router initialisation, and whole backbones at K = M."""

import pytest
import torch

from ubsmoe.model import ModelSpec, build_model, load_tokenizer
from ubsmoe.tasks.classification import classification_head
from ubsmoe.model.pretrained import load_dense_backbone
from ubsmoe.model.upcycle import balanced_assign, balanced_kmeans, split_ffn

from test_moe_layer import dense_ffn


def test_balanced_kmeans_gives_equal_groups_covering_every_neuron():
    vectors = torch.randn(48, 8, generator=torch.Generator().manual_seed(0))
    assignment = balanced_kmeans(vectors, 6)
    assert torch.bincount(assignment, minlength=6).tolist() == [8] * 6


def test_balanced_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(4, 16) * 10
    vectors = torch.cat([c + 0.1 * torch.randn(5, 16, generator=g) for c in centres])
    assignment = balanced_kmeans(vectors, 4)
    for block in assignment.view(4, 5):
        assert len(set(block.tolist())) == 1
    assert len(set(assignment.tolist())) == 4


def test_balanced_assign_respects_capacity():
    sim = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    assert balanced_assign(sim, 2).tolist() == [0, 0, 1, 1]


def test_split_refuses_unequal_groups():
    with pytest.raises(ValueError, match="choose num_experts dividing 32"):
        split_ffn(dense_ffn(False), 5)


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_llama"])
@pytest.mark.parametrize("router_init", ["centroid", "calibrated"])
def test_upcycled_backbone_at_k_equal_m_equals_the_dense_backbone(backbone, router_init, request):
    path = str(request.getfixturevalue(backbone))
    tokenizer = load_tokenizer(path)
    enc = tokenizer(["the bank rates market", "a film star show music award win"], padding=True, return_tensors="pt")
    batches = [(enc["input_ids"], enc["attention_mask"])]
    model = build_model(ModelSpec(backbone=path, num_experts=4, lora_rank=4, router_init=router_init), classification_head(3),
                             calibration_batches=batches)
    model.set_top_k(4)

    assert_equals_dense(model, path, enc)
    assert model(enc["input_ids"], enc["attention_mask"]).shape == (2, 3)


def assert_equals_dense(model, path: str, enc) -> None:
    """The model's last hidden states on the real tokens of ``enc`` are the dense backbone's (1e-4)."""
    dense, _ = load_dense_backbone(path)
    model.eval()
    dense.eval()
    with torch.no_grad():
        model.context.token_mask = enc["attention_mask"].bool()
        ours = model.backbone(**enc).last_hidden_state
        theirs = dense(**enc).last_hidden_state
    mask = enc["attention_mask"].bool()
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-4, atol=1e-4)


def test_trainable_parameters_are_adapters_routers_and_head_only(tiny_bert):
    model = build_model(ModelSpec(backbone=str(tiny_bert), num_experts=4, lora_rank=4, router_init="centroid"), classification_head(3))
    report = model.parameter_report()
    d, h, layers = 32, 64, 2
    assert report["experts_lora_per_expert"] == 2 * 4 * (d + h // 4)
    assert report["experts_lora"] == layers * 4 * report["experts_lora_per_expert"]
    assert report["attention_lora"] == layers * 2 * 4 * (d + d)
    assert report["router"] == layers * 4 * d
    assert report["head"] == d * 3 + 3
    assert report["total_trainable"] == sum(v for k, v in report.items()
                                            if k in ("experts_lora", "attention_lora", "router", "head"))


def test_calibrated_router_needs_calibration_data(tiny_bert):
    with pytest.raises(ValueError, match="need calibration batches"):
        build_model(ModelSpec(backbone=str(tiny_bert), num_experts=4, router_init="calibrated"), classification_head(3))


def test_unknown_backbone_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json missing"):
        build_model(ModelSpec(backbone=str(tmp_path)), classification_head(3))


def test_the_upcycling_cache_gives_the_same_model_without_upcycling_again(tiny_bert, tiny_task, tmp_path, monkeypatch):
    """The first build writes the upcycled experts and routers; a second build reads them instead of
    clustering and calibrating again, and the two models are equal tensor for tensor."""
    from tiny_experiment import tiny_overrides
    from ubsmoe.config import load_config
    from ubsmoe.engine.experiment import build_experiment
    import ubsmoe.model.moe_model as moe_model

    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task))
    first = build_experiment(config, upcycle_cache=tmp_path)
    (written,) = tmp_path.glob("*.safetensors")

    def no_upcycling(*args, **kwargs):
        raise AssertionError("upcycled again")

    monkeypatch.setattr(moe_model, "upcycled_parts", no_upcycling)
    monkeypatch.setattr(moe_model, "capture_ffn_inputs", no_upcycling)
    second = build_experiment(config, upcycle_cache=tmp_path)

    a, b = first.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, seed=1))
    with pytest.raises(AssertionError, match="upcycled again"):  # another seed: another key, built anew
        build_experiment(other, upcycle_cache=tmp_path)
    assert list(tmp_path.glob("*.safetensors")) == [written]
