"""``ubsmoe bench upcycle``: how close the upcycled MiniLM stays to the dense one before any training.

For K in {1, 2, 4, 6, 8} of M = 8 and each router initialisation, the mean cosine similarity between
the upcycled and the dense model's mean-pooled outputs on BBC News test articles. The calibrated
router is fitted on 64 training articles; the oracle row routes every token to the experts whose
outputs are largest, the best any router can do with this split.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ubsmoe.data.dataset import TokenizedDataset, tokenize
from ubsmoe.data.sources import load_train_test
from ubsmoe.model import MoEHook, ModelSpec, build_model, load_tokenizer
from ubsmoe.model.moe_model import load_dense_backbone
from ubsmoe.tasks.classification import classification_head


class OracleRouting(MoEHook):
    """Select the experts with the largest output norms (computed densely: a measuring device only)."""

    def __init__(self):
        self.inputs = None

    def modulate(self, layer, select, logits):
        with torch.no_grad():
            x = self.inputs[layer]
            norms = torch.stack([layer._all_experts(x, torch.nn.functional.one_hot(
                torch.full((x.shape[0],), e), layer.num_experts).to(x.dtype)).norm(dim=1)
                for e in range(layer.num_experts)], 1)
        return norms, logits


def pooled_outputs(forward, data: TokenizedDataset, batch_size: int = 32) -> torch.Tensor:
    chunks = []
    for ids, mask, _ in data.batches(batch_size):
        hidden = forward(ids, mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        chunks.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(chunks)


@torch.inference_mode()
def run(out: Path, ks: tuple[int, ...] = (1, 2, 4, 6, 8), num_experts: int = 8, max_length: int = 128,
        eval_articles: int = 150, calibration_articles: int = 64, threads: int = 2, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    data = load_train_test("bbc_news")  # the experiments' deduplicated split
    train, test = data.train, data.test
    tokenizer = load_tokenizer("minilm")
    step = max(1, len(test) // eval_articles)
    evaluation = tokenize(test.subset(range(0, len(test), step)), tokenizer, max_length)
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:calibration_articles]
    calibration_data = tokenize(train.subset(chosen.tolist()), tokenizer, max_length)
    calibration = [(ids, mask) for ids, mask, _ in calibration_data.batches(32)]

    dense, _ = load_dense_backbone("minilm")
    dense.eval()
    reference = pooled_outputs(lambda i, m: dense(input_ids=i, attention_mask=m).last_hidden_state, evaluation)

    rows = []
    for init in ("centroid", "calibrated", "oracle"):
        model = build_model(ModelSpec(num_experts=num_experts, router_init="centroid" if init == "oracle" else init,
                                      seed=seed), classification_head(5), calibration_batches=calibration)
        model.eval()
        if init == "oracle":
            oracle = OracleRouting()
            for layer in model.moe_layers:
                layer.hooks.append(oracle)
                layer.register_forward_pre_hook(lambda lay, args, o=oracle: _remember_tokens(o, lay, args))
        for k in ks:
            model.set_top_k(k)

            def forward(ids, mask):
                model.context.token_mask = mask.bool()
                return model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state

            cosine = torch.nn.functional.cosine_similarity(pooled_outputs(forward, evaluation), reference)
            rows.append({"router": init, "k": k, "mean_cosine": cosine.mean().item(), "min_cosine": cosine.min().item()})
    result = {"benchmark": "upcycle-fidelity", "backbone": "minilm", "num_experts": num_experts,
              "max_length": max_length, "eval_articles": len(evaluation), "calibration_articles": calibration_articles,
              "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(to_markdown(result))
    return result


def _remember_tokens(oracle: OracleRouting, layer, args) -> None:
    hidden = args[0].reshape(-1, layer.d_model)
    mask = layer.context.token_mask
    x = hidden if mask is None else hidden[mask.reshape(-1)]
    oracle.inputs = {layer: x}


def to_markdown(result: dict) -> str:
    ks = sorted({r["k"] for r in result["rows"]})
    lines = [f"# Upcycled MiniLM vs dense before training: mean cosine of pooled outputs "
             f"({result['eval_articles']} BBC News test articles, M={result['num_experts']})", "",
             "| router | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
    for router in ("centroid", "calibrated", "oracle"):
        values = {r["k"]: r["mean_cosine"] for r in result["rows"] if r["router"] == router}
        lines.append(f"| {router} | " + " | ".join(f"{values[k]:.3f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"
