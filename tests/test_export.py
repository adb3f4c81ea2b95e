"""``ubsmoe export``: a dense-model run's tiers as PEFT LoRA adapters that ``peft.PeftModel.from_pretrained``
loads onto the original backbone with the same outputs as ubsmoe's tier model (classification on a tiny
BERT, causal-lm on a tiny Llama; FLoRA's merged rounds included), and a sparse run's tiers as folders
``ubsmoe predict`` loads."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tiny_experiment import causal_overrides, tiny_overrides
from ubsmoe.cli import main
from ubsmoe.engine.saved_model import load_model
from ubsmoe.model import load_tokenizer

peft = pytest.importorskip("peft")

TEXTS = ["bank rates market profit the of", "film music award star a", "game match team goal to in and is"]


def finished_run(tmp_path_factory, overrides: list[str], method: str):
    out = tmp_path_factory.mktemp(f"export-{method}") / "run"
    assert main(["run", "--quiet", "--method", method, "--out", str(out)] + overrides) == 0
    return out


@pytest.mark.parametrize("method", ["hetlora", "flora"])  # ranks per tier; rounds merged into the base
def test_a_dense_classification_tier_is_a_peft_adapter_with_the_same_outputs(method, tiny_bert, tiny_task,
                                                                            tmp_path_factory, tmp_path):
    from transformers import AutoModel

    run = finished_run(tmp_path_factory, tiny_overrides(tiny_bert, tiny_task, **{"federation.rounds": 3}), method)
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    loaded = load_model(run)
    encoded = load_tokenizer(str(tiny_bert))(TEXTS, padding=True, return_tensors="pt")
    real = encoded["attention_mask"].bool()

    ranks = {}
    for tier in loaded.tiers:
        folder = tmp_path / "export" / f"tier-{tier:g}"
        config = json.loads((folder / "adapter_config.json").read_text())
        ranks[tier] = config["r"]
        base = AutoModel.from_pretrained(str(tiny_bert)).eval()
        peft_model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
        loaded.setup_tier(tier)
        with torch.no_grad():
            ours = loaded.experiment.model.hidden_states(encoded["input_ids"], encoded["attention_mask"])
            theirs = peft_model(**encoded).last_hidden_state
        torch.testing.assert_close(theirs[real], ours[real], atol=2e-5, rtol=1e-4)
        with peft_model.disable_adapter(), torch.no_grad():  # the adapter does change the backbone
            plain = peft_model(**encoded).last_hidden_state
        assert (plain[real] - ours[real]).abs().max() > 1e-3

        head = load_file(str(folder / "task_head.safetensors"))
        with torch.no_grad():  # the head beside the adapter gives ubsmoe's logits from PEFT's hidden states
            logits = loaded.experiment.model.head(theirs, real)
            pooled = (theirs * real.unsqueeze(-1)).sum(1) / real.sum(1, keepdim=True)
        torch.testing.assert_close(pooled @ head["linear.weight"].T + head["linear.bias"], logits, atol=2e-5, rtol=1e-4)
    if method == "hetlora":  # the low tier's adapter has the low tier's rank: r_c = floor(4 * 0.5)
        assert ranks == {0.5: 2, 1.0: 4}
    else:  # FLoRA: the merged rounds (stacked client factors) add ranks beyond the current adapter's
        assert all(r > 4 for r in ranks.values())


def test_a_dense_causal_lm_tier_is_a_peft_adapter_for_the_causal_lm(tiny_causal_llama, tiny_suite, tmp_path_factory,
                                                                   tmp_path):
    from transformers import AutoModelForCausalLM

    run = finished_run(tmp_path_factory, causal_overrides(tiny_causal_llama, tiny_suite, **{"train.lr": 0.05}),
                       "flexlora")
    assert main(["export", "--run", str(run), "--out", str(tmp_path), "--tier", "0.5"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tier-0.5"]
    loaded = load_model(run)
    loaded.setup_tier(0.5)
    ids = torch.tensor([[1, 5, 9, 7, 12, 3], [1, 8, 4, 4, 10, 2]])
    mask = torch.ones_like(ids)
    peft_model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_causal_llama)),
                                                str(tmp_path / "tier-0.5")).eval()
    with torch.no_grad():
        ours = loaded.experiment.model(ids, mask).view(2, 6, -1)
        theirs = peft_model(input_ids=ids, attention_mask=mask).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs, ours, atol=2e-5, rtol=1e-4)
    assert (plain - ours).abs().max() > 1e-3


def test_a_sparse_tier_exports_as_a_folder_that_predict_loads(tiny_bert, tiny_task, tmp_path_factory, tmp_path, capsys):
    run = finished_run(tmp_path_factory, tiny_overrides(tiny_bert, tiny_task), "smoe")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS))
    for tier in (0.5, 1.0):
        folder = tmp_path / "export" / f"tier-{tier:g}"
        assert not (folder / "adapter_config.json").exists()
        assert main(["predict", "--run", str(folder), "--tier", str(tier), "--input", str(texts),
                     "--output", str(tmp_path / f"{tier}.jsonl")]) == 0
        assert main(["predict", "--run", str(run), "--tier", str(tier), "--input", str(texts),
                     "--output", str(tmp_path / f"run-{tier}.jsonl")]) == 0
        assert (tmp_path / f"{tier}.jsonl").read_text() == (tmp_path / f"run-{tier}.jsonl").read_text()
    assert main(["predict", "--run", str(tmp_path / "export" / "tier-0.5"), "--tier", "1.0", "--input", str(texts),
                 "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "--tier 1 is not a tier of this model; its tiers are 0.5" in capsys.readouterr().err
