"""Where backbones load from: built-in packages (MiniLM, SmolLM2 as GGUF), checkpoint folders, GGUF files."""

import importlib.util

import pytest
import torch

from ubsmoe.model import ModelSpec, build_model, load_tokenizer
from ubsmoe.tasks.classification import classification_head
from ubsmoe.model.backbones import BackboneSource, resolve_backbone
from ubsmoe.model.pretrained import load_dense_backbone


def test_builtin_backbones_resolve_to_installed_files():
    minilm = resolve_backbone("minilm")
    assert minilm.gguf_file is None and (minilm.folder / "config.json").is_file()
    smollm2 = resolve_backbone("smollm2")
    assert smollm2.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (smollm2.folder / smollm2.gguf_file).stat().st_size > 90e6
    assert smollm2.pretrained_kwargs() == {"local_files_only": True, "trust_remote_code": False,
                                           "gguf_file": smollm2.gguf_file}


def test_a_local_gguf_file_resolves_to_its_folder(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    assert resolve_backbone(str(path)) == BackboneSource(tmp_path, "model.gguf")


def test_missing_backbones_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="or an existing .gguf file"):
        resolve_backbone(str(tmp_path / "absent.gguf"))
    with pytest.raises(FileNotFoundError, match=r"config.json missing\): pass a built-in backbone \(minilm, smollm2\)"):
        resolve_backbone(str(tmp_path))


def test_gguf_without_its_reader_packages_names_them(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "gguf" else find_spec(name))
    with pytest.raises(ImportError, match="needs the packages gguf: run `pip install gguf`"):
        resolve_backbone(str(path))


def test_smollm2_upcycled_at_k_equal_m_equals_the_dense_model():
    """The real SmolLM2-135M (GGUF, dequantised): 30 SwiGLU layers split into 8 experts each, every expert
    active, reproduce the dense model's hidden states; the tokenizer pads, and the classification head pools the
    last real token."""
    tokenizer = load_tokenizer("smollm2")
    texts = ["Shares in the bank rose after strong profits.", "The film won the award."]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    assert enc["attention_mask"].sum(1).tolist() == [len(tokenizer(t)["input_ids"]) for t in texts]
    model = build_model(ModelSpec(backbone="smollm2", num_experts=8, lora_rank=4, router_init="centroid"), classification_head(5))
    assert model.family.name == "llama" and len(model.moe_layers) == 30
    assert model.moe_layers[0].w_gate.shape == (8, 576, 192)
    dense, _ = load_dense_backbone("smollm2")
    model.eval()
    dense.eval()
    mask = enc["attention_mask"].bool()
    with torch.no_grad():
        model.context.token_mask = mask
        ours = model.backbone(**enc).last_hidden_state
        model.context.token_mask = None
        theirs = dense(**enc).last_hidden_state
        logits = model(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-3, atol=1e-3)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
