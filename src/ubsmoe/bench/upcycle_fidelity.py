"""``ubsmoe bench upcycle``: how much of a dense backbone an upcycled one keeps before any training, with
S of its M = 8 expert slots shared (always on), at every K.

Per backbone, for S in {0, 1, 2} and K in {2, 4, 6, 8} (K counts the shared experts: S shared and K - S
routed; at K = S the shared part runs alone), with the routers calibrated on 64 training texts as a run calibrates them:
- causal LM (SmolLM2): the round-0 loss over every token of commonsense test prompts with their reference
  responses, beside the dense model's;
- classification (MiniLM): the relative error of the mean-pooled output against the dense model's, and
  the test accuracy of a linear probe fitted on the pooled outputs of BBC News training articles, beside
  the dense model's probe;
- per layer: the relative error ||y - y_dense|| / ||y_dense|| of the FFN's output against the dense FFN's
  on the same input (the upcycled model's own hidden states), over all real tokens.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from ubsmoe.data.commonsense import load_commonsense
from ubsmoe.data.dataset import tokenize
from ubsmoe.data.sources import load_train_test
from ubsmoe.model import ModelSpec, build_model, load_tokenizer
from ubsmoe.model.pretrained import load_dense_backbone

GOAL_NATS = 3.0  # SmolLM2 at K = 2 of 8: round-0 loss within this of the dense model's


class LayerErrors:
    """Forward hooks on every FFN of a model: the squared error of its output against the dense FFN's on the
    same input, and the dense output's squared norm, summed over real tokens, per layer."""

    def __init__(self, modules, dense_ffns, context):
        self.dense_ffns, self.context = dense_ffns, context
        self.error = [0.0] * len(dense_ffns)
        self.norm = [0.0] * len(dense_ffns)
        self.handles = [module.register_forward_hook(self._hook(i)) for i, module in enumerate(modules)]

    def _hook(self, index):
        def hook(_module, args, output):
            mask = self.context.token_mask
            x, y = args[0], output
            if mask is not None:
                x, y = x[mask], y[mask]
            reference = self.dense_ffns[index](x.reshape(-1, x.shape[-1]))
            self.error[index] += float((y.reshape(reference.shape) - reference).double().pow(2).sum())
            self.norm[index] += float(reference.double().pow(2).sum())
        return hook

    def relative(self) -> list[float]:
        return [(e / n) ** 0.5 if n else 0.0 for e, n in zip(self.error, self.norm)]

    def reset(self) -> None:
        self.error = [0.0] * len(self.dense_ffns)
        self.norm = [0.0] * len(self.dense_ffns)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def ffn_modules(backbone, family) -> list[torch.nn.Module]:
    """The module that computes each layer's FFN (the upcycled block once installed)."""
    return [layer.output.dense if family.name == "bert" else layer.mlp for layer in family.layers(backbone)]


def causal_texts(folder: Path, tokenizer, per_task: int, calibration: int, max_length: int, seed: int):
    """(evaluation batches, calibration batches): commonsense test questions with their reference responses
    (``per_task`` of each task, seeded), and training examples for the routers' calibration."""
    suite = load_commonsense(folder)
    rng = random.Random(seed)
    test = [e for task in suite.tasks for e in rng.sample(suite.test[task], min(per_task, len(suite.test[task])))]
    train = [e for examples in suite.train.values() for e in examples]
    train = rng.sample(train, min(calibration, len(train)))

    def batches(examples):
        texts = [e.prompt + e.response() + tokenizer.eos_token for e in examples]
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        return [(ids[i:i + 8], mask[i:i + 8]) for i in range(0, len(texts), 8)]

    return batches(test), batches(train)


@torch.inference_mode()
def lm_loss(hidden_of, weight: torch.Tensor, batches) -> float:
    """Mean next-token loss over every real token of ``batches``; ``hidden_of(ids, mask)`` -> (B, S, d)."""
    total, count = 0.0, 0
    for ids, mask in batches:
        hidden = hidden_of(ids, mask)
        carries = mask[:, 1:].bool()
        logits = F.linear(hidden[:, :-1][carries], weight)
        total += float(F.cross_entropy(logits.float(), ids[:, 1:][carries], reduction="sum"))
        count += int(carries.sum())
    return total / count


@torch.inference_mode()
def pooled(hidden_of, data, batch_size: int = 32) -> torch.Tensor:
    chunks = []
    for ids, mask, _ in data.batches(batch_size):
        hidden = hidden_of(ids, mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        chunks.append((hidden * weights).sum(1) / weights.sum(1))
    return torch.cat(chunks)


def probe_accuracy(train_x, train_y, test_x, test_y, steps: int = 200) -> float:
    """A multinomial logistic regression on standardised features (L-BFGS, a small L2 penalty)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    with torch.enable_grad():
        weight = torch.zeros(a.shape[1], int(train_y.max()) + 1, requires_grad=True)
        bias = torch.zeros(weight.shape[1], requires_grad=True)
        optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

        def closure():
            optimiser.zero_grad()
            loss = F.cross_entropy(a @ weight + bias, train_y) + 1e-3 * weight.pow(2).sum()
            loss.backward()
            return loss

        optimiser.step(closure)
    return float(((b @ weight + bias).argmax(1) == test_y).double().mean())


def run(out: Path, backbones: tuple[str, ...] = ("minilm", "smollm2"), shared: tuple[int, ...] = (0, 1, 2),
        ks: tuple[int, ...] = (2, 4, 6, 8), num_experts: int = 8, commonsense: str = "../shared/data/commonsense",
        per_task: int = 8, calibration: int = 64, threads: int = 2, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    result = {"benchmark": "upcycle-fidelity", "num_experts": num_experts, "calibration_texts": calibration,
              "goal_nats": GOAL_NATS, "backbones": {}}
    for backbone in backbones:
        causal = backbone == "smollm2"
        tokenizer = load_tokenizer(backbone)
        if causal:
            evaluation, calibration_batches = causal_texts(Path(commonsense), tokenizer, per_task, calibration, 256, seed)
            texts = sum(int(ids.shape[0]) for ids, _ in evaluation)
        else:
            data = load_train_test("bbc_news")  # the experiments' deduplicated split
            train = tokenize(data.train.subset(range(0, len(data.train), max(1, len(data.train) // 400))), tokenizer, 128)
            test = tokenize(data.test, tokenizer, 128)
            chosen = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:calibration]
            calibration_batches = [(i, m) for i, m, _ in
                                   tokenize(data.train.subset(chosen.tolist()), tokenizer, 128).batches(32)]
            train_y = torch.tensor([int(y) for _, _, labels in train.batches(10**6) for y in labels])
            test_y = torch.tensor([int(y) for _, _, labels in test.batches(10**6) for y in labels])
            texts = len(test)
        dense, family = load_dense_backbone(backbone)
        dense.eval()
        dense_ffns = [family.extract_ffn(layer) for layer in family.layers(dense)]

        def dense_hidden(ids, mask):
            return dense(input_ids=ids, attention_mask=mask).last_hidden_state

        entry = {"task": "causal-lm" if causal else "classification", "evaluation_texts": texts, "rows": []}
        if causal:
            entry["dense_loss"] = lm_loss(dense_hidden, dense.get_input_embeddings().weight, evaluation)
        else:
            reference_test, reference_train = pooled(dense_hidden, test), pooled(dense_hidden, train)
            entry["dense_probe_accuracy"] = probe_accuracy(reference_train, train_y, reference_test, test_y)
        for s in shared:
            model = build_model(ModelSpec(backbone=backbone, num_experts=num_experts, shared_experts=s, seed=seed),
                                lambda backbone_, family_, generator: torch.nn.Identity(),
                                calibration_batches=calibration_batches)
            model.eval()
            errors = LayerErrors(ffn_modules(model.backbone, family), dense_ffns, model.context)

            def hidden(ids, mask):
                return model.hidden_states(ids, mask)

            for k in ks:
                if k < s:  # K_c = S runs the shared part alone
                    continue
                model.set_top_k(k - s)
                errors.reset()
                row = {"shared": s, "k": k}
                if causal:
                    row["loss"] = lm_loss(hidden, model.backbone.get_input_embeddings().weight, evaluation)
                else:
                    test_x = pooled(hidden, test)
                    row["pooled_error"] = float(((test_x - reference_test).norm(dim=1)
                                                 / reference_test.norm(dim=1)).mean())
                    row["probe_accuracy"] = probe_accuracy(pooled(hidden, train), train_y, test_x, test_y)
                row["layer_error"] = errors.relative()
                entry["rows"].append(row)
                print(f"{backbone} S={s} K={k}: " + ", ".join(f"{key} {value:.3f}" for key, value in row.items()
                                                               if isinstance(value, float)), flush=True)
            errors.close()
            del model
        result["backbones"][backbone] = entry
        del dense
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    lines = [f"# Upcycled backbones before training, M = {result['num_experts']}, S shared experts", "",
             "Made by `ubsmoe bench upcycle --out benchmarks/upcycle_fidelity.json`. K counts the shared "
             "experts (S shared and K - S routed); routers calibrated on "
             f"{result['calibration_texts']} training texts.", ""]
    for backbone, entry in result["backbones"].items():
        ks = sorted({r["k"] for r in entry["rows"]})
        shared = sorted({r["shared"] for r in entry["rows"]})
        causal = entry["task"] == "causal-lm"
        key = "loss" if causal else "probe_accuracy"
        what = ("round-0 loss over every token (nats)" if causal
                else "linear-probe test accuracy on mean-pooled outputs")
        reference = entry["dense_loss"] if causal else entry["dense_probe_accuracy"]
        lines += [f"## {backbone}: {what}; the dense model: {reference:.3f} ({entry['evaluation_texts']} texts)", "",
                  "| S | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for s in shared:
            values = {r["k"]: r[key] for r in entry["rows"] if r["shared"] == s}
            lines.append(f"| {s} | " + " | ".join(f"{values[k]:.3f}" if k in values else "-" for k in ks) + " |")
        if not causal:
            lines += ["", "Relative error of the mean-pooled output against the dense model's:", "",
                      "| S | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
            for s in shared:
                values = {r["k"]: r["pooled_error"] for r in entry["rows"] if r["shared"] == s}
                lines.append(f"| {s} | " + " | ".join(f"{values[k]:.3f}" if k in values else "-" for k in ks) + " |")
        lines += ["", "Relative error of each FFN's output against the dense FFN's, mean (max) over layers:", "",
                  "| S | " + " | ".join(f"K={k}" for k in ks) + " |", "|---" * (len(ks) + 1) + "|"]
        for s in shared:
            values = {r["k"]: r["layer_error"] for r in entry["rows"] if r["shared"] == s}
            lines.append(f"| {s} | " + " | ".join(
                f"{sum(values[k]) / len(values[k]):.2f} ({max(values[k]):.2f})" if k in values else "-" for k in ks) + " |")
        if causal and 2 in ks:
            best = min((r for r in entry["rows"] if r["k"] == 2), key=lambda r: r["loss"])
            gap = best["loss"] - reference
            lines += ["", f"Goal at K = 2: within {result['goal_nats']:.1f} nats of the dense model. Best S = "
                          f"{best['shared']}: +{gap:.2f} nats ({'met' if gap <= result['goal_nats'] else 'not met'})."]
        lines.append("")
    return "\n".join(lines)
