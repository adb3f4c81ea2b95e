"""``ubsmoe bench pg-fidelity``: the Universal Pseudo-Gradient against the gradient it stands in for.

For every MoE layer and every expert that some token of a batch did not activate, two gradients of its
LoRA factors (all of them, concatenated):
- the pseudo-gradient the method hands it (``PseudoGradient``, rho = 1 - K/M): the layer's gradients with
  the hook minus those without it, on the same batch;
- the true gradient it would get from the same tokens if it were active for them, with the gate value the
  layer gives an active expert (1 for the straight-through gate of upcycled models, p_i for softmax
  gates): sum over those tokens of w_i(x) J_i(x)^T g(x), where g(x) is the gradient arriving at the
  layer's output and J_i the Jacobian of expert i's output in its LoRA factors, computed by running the
  expert on those tokens.
Reported per layer: the mean cosine between the two over experts, the same cosine against another
expert's true gradient (what an unrelated direction gives), and the median norm ratio. Upcycled
backbones (MiniLM on BBC News, SmolLM2 on commonsense responses) with S = 0 and S = 1 shared experts at
K = 2 of 8, and a small random OLMoE-shaped model (native experts) at K = 2 of 8. The LoRA B factors
start at zero (no gradient reaches A through a zero B), so they are drawn small (N(0, 0.02^2)) here, as
after some training.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

from ubsmoe.model import ModelSpec, build_model, load_tokenizer
from ubsmoe.model.moe_layer import MoEHook, SparseMoEFFN
from ubsmoe.model.pseudo_gradient import PseudoGradient, sparsity_factor


class _ReadsEveryExpert(MoEHook):
    """Changes nothing; makes a layer take its LoRA products over every (token, expert) pair, as with PG."""

    reads_every_expert = True


def lora_names(layer: SparseMoEFFN) -> list[str]:
    return [f"lora_{name}_{side}" for name in layer.adapted for side in ("a", "b")]


def expert_vector(grads: dict[str, torch.Tensor], expert: int) -> torch.Tensor:
    return torch.cat([g[expert].reshape(-1) for g in grads.values()])


def measure(model, loss_fn, k: int, draw_b: bool = True) -> list[dict]:
    """Per layer: cosines and norm ratios of every partly inactive expert (see the module docstring); with
    ``draw_b`` the LoRA B factors are drawn first (N(0, 0.02^2))."""
    model.eval()  # no dropout: the two passes see the same computation
    model.set_top_k(k)
    layers = list(model.moe_layers)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in layers if draw_b else []:
            for name in lora_names(layer):
                if name.endswith("_b"):
                    getattr(layer, name).normal_(0, 0.02, generator=generator)
    rho = sparsity_factor("1-k/m", k, k, layers[0].num_experts)
    captured: dict[SparseMoEFFN, dict] = {}

    def remember(layer, args, output):
        mask = layer.context.token_mask
        x = args[0] if mask is None else args[0][mask]
        captured[layer] = {"x": x.detach().reshape(-1, layer.d_model), "record": layer.last_routing, "mask": mask}
        output.register_hook(lambda grad, layer=layer: captured[layer].__setitem__(
            "g", (grad if mask is None else grad[mask]).reshape(-1, layer.d_model)))

    handles = [layer.register_forward_hook(remember) for layer in layers]
    grads = []
    for with_pg in (True, False):
        # Without PG, a hook that only reads every expert: the true gradient then takes the same products
        # (over every (token, expert) pair) as with PG, so float32 rounding does not enter the difference
        hooks = [PseudoGradient(rho)] if with_pg else [_ReadsEveryExpert()]
        model.attach_hooks(hooks)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss_fn(model).backward()
        for layer in layers:
            for hook in hooks:
                if with_pg:
                    hook.apply(layer)
        model.detach_hooks(hooks)
        grads.append([{n: getattr(layer, n).grad.detach().clone() for n in lora_names(layer)} for layer in layers])
    for handle in handles:
        handle.remove()

    rows = []
    for index, layer in enumerate(layers):
        pseudo = {n: grads[0][index][n] - grads[1][index][n] for n in lora_names(layer)}
        true = counterfactual(layer, captured[layer])
        record = captured[layer]["record"]
        inactive = torch.ones_like(record.probs, dtype=torch.bool).scatter_(1, record.experts, False)
        experts = [e for e in range(layer.num_experts) if bool(inactive[:, e].any())]
        cosines, unrelated, ratios = [], [], []
        for e in experts:
            p, t = expert_vector(pseudo, e), expert_vector(true, e)
            other = expert_vector(true, (e + 1) % layer.num_experts)
            if t.norm() == 0 or p.norm() == 0:
                continue
            cosines.append(float(torch.nn.functional.cosine_similarity(p, t, dim=0)))
            unrelated.append(float(torch.nn.functional.cosine_similarity(p, other, dim=0)))
            ratios.append(float(p.norm() / t.norm()))
        if cosines:
            rows.append({"layer": index, "experts": len(cosines), "cosine": statistics.mean(cosines),
                         "cosine_min": min(cosines), "cosine_max": max(cosines),
                         "cosine_unrelated": statistics.mean(unrelated), "norm_ratio": statistics.median(ratios)})
    return rows


def counterfactual(layer: SparseMoEFFN, seen: dict) -> dict[str, torch.Tensor]:
    """sum over the tokens where expert i was inactive of w_i(x) J_i(x)^T g(x), for every expert i, by running
    every expert on every token with those weights (active pairs weighted 0)."""
    record, x, g = seen["record"], seen["x"], seen["g"]
    probs = record.probs.detach()
    inactive = torch.ones_like(probs, dtype=torch.bool).scatter_(1, record.experts, False)
    if layer.gate_mode == "straight_through":
        value = torch.ones_like(probs)
    elif layer.gate_mode == "softmax_renorm":
        value = probs / probs.gather(1, record.experts).sum(1, keepdim=True)
    else:
        value = probs
    weights = torch.where(inactive, value, torch.zeros_like(value))
    mode, layer.gate_mode = layer.gate_mode, "softmax"  # a plain product by the weights, whatever the gate
    try:
        with torch.enable_grad():
            y = layer._all_experts(x, weights)
            params = [getattr(layer, n) for n in lora_names(layer)]
            found = torch.autograd.grad((y * g).sum(), params)
    finally:
        layer.gate_mode = mode
    return dict(zip(lora_names(layer), found))


def causal_batch(tokenizer, folder: Path, size: int = 8, max_length: int = 256):
    from ubsmoe.data.commonsense import load_commonsense

    suite = load_commonsense(folder)
    examples = [suite.train[t][i] for i in range(size // len(suite.train) + 1) for t in sorted(suite.train)][:size]
    encoded = tokenizer([e.prompt + e.response() for e in examples], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"]


def lm_loss(ids, mask):
    def loss(model):
        hidden = model.hidden_states(ids, mask)
        carries = mask[:, 1:].bool()
        logits = torch.nn.functional.linear(hidden[:, :-1][carries], model.backbone.get_input_embeddings().weight)
        return torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][carries])
    return loss


def classification_loss(ids, mask, labels):
    def loss(model):
        return torch.nn.functional.cross_entropy(model(ids, mask), labels)
    return loss


def run(out: Path, commonsense: str = "../shared/data/commonsense", shared: tuple[int, ...] = (0, 1), k: int = 2,
        threads: int = 2) -> dict:
    from ubsmoe.bench.native_load import write_checkpoint
    from ubsmoe.data.dataset import tokenize
    from ubsmoe.data.sources import load_train_test
    from ubsmoe.tasks.classification import classification_head

    torch.set_num_threads(threads)
    result = {"benchmark": "pg-fidelity", "k": k, "num_experts": 8, "settings": []}
    data = load_train_test("bbc_news")
    tokenizer = load_tokenizer("minilm")
    bbc = tokenize(data.train.subset(range(16)), tokenizer, 128)
    ids, mask, labels = next(bbc.batches(16))
    calibration = [(i, m) for i, m, _ in tokenize(data.train.subset(range(16, 80)), tokenizer, 128).batches(32)]
    settings = [(f"minilm, S = {s}", "minilm", s, calibration, classification_loss(ids, mask, labels), 5)
                for s in shared]
    smol = load_tokenizer("smollm2")
    causal_ids, causal_mask = causal_batch(smol, Path(commonsense))
    settings += [(f"smollm2, S = {s}", "smollm2", s, [(causal_ids, causal_mask)], lm_loss(causal_ids, causal_mask), 5)
                 for s in shared]
    with tempfile.TemporaryDirectory() as scratch:
        write_checkpoint(Path(scratch), layers=4, experts=8, hidden=128, expert_width=64, vocab=200)
        native_ids = torch.randint(3, 200, (8, 64), generator=torch.Generator().manual_seed(0))
        native_mask = torch.ones_like(native_ids)
        native_labels = torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(1))
        settings.append(("random OLMoE-shaped (4 layers, 8 experts)", scratch, 0, None,
                         classification_loss(native_ids, native_mask, native_labels), 3))
        for label, backbone, s, batches, loss, labels_count in settings:
            model = build_model(ModelSpec(backbone=backbone, num_experts=8, shared_experts=s),
                                classification_head(labels_count), calibration_batches=batches)
            rows = measure(model, loss, k - s)
            result["settings"].append({"setting": label, "shared": s, "rows": rows,
                                       "cosine": statistics.mean(r["cosine"] for r in rows),
                                       "cosine_unrelated": statistics.mean(r["cosine_unrelated"] for r in rows),
                                       "norm_ratio": statistics.median(r["norm_ratio"] for r in rows)})
            print(f"{label}: cosine {result['settings'][-1]['cosine']:.3f}, unrelated "
                  f"{result['settings'][-1]['cosine_unrelated']:.3f}, norm ratio {result['settings'][-1]['norm_ratio']:.2f}",
                  flush=True)
            del model
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    lines = ["# The pseudo-gradient against the true gradient of the experts it stands in for", "",
             "Made by `ubsmoe bench pg-fidelity --out benchmarks/pg_fidelity.json`. Per setting, K = "
             f"{result['k']} of {result['num_experts']} (counting shared experts), one batch: the mean over layers of "
             "the mean cosine over inactive experts between each expert's pseudo-gradient and the gradient it would "
             "get from the same tokens if active, the same cosine against another expert's true gradient, and the "
             "median norm ratio.", "",
             "| setting | cosine | cosine with another expert's | norm ratio |", "|---|---|---|---|"]
    for s in result["settings"]:
        lines.append(f"| {s['setting']} | {s['cosine']:.3f} | {s['cosine_unrelated']:.3f} | {s['norm_ratio']:.2f} |")
    for s in result["settings"]:
        lines += ["", f"## {s['setting']}: per layer", "", "| layer | experts | cosine (min, max) | unrelated | norm ratio |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['layer']} | {r['experts']} | {r['cosine']:.3f} ({r['cosine_min']:.2f}, {r['cosine_max']:.2f}) | "
                  f"{r['cosine_unrelated']:.3f} | {r['norm_ratio']:.2f} |" for r in s["rows"]]
    return "\n".join(lines) + "\n"
