"""Per-tier evaluation: each tier runs the model a client of that budget holds, on the same test set."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ubsmoe.data.dataset import TokenizedDataset
from ubsmoe.methods.base import FederatedMethod, ServerState
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.model import MoEClassifier


@torch.inference_mode()
def evaluate(model: MoEClassifier, data: TokenizedDataset, batch_size: int,
             flop_counter: FlopCounter | None = None) -> dict:
    """Accuracy, mean loss, per-layer expert load (L, E) of the model as it is configured now, and with
    a counter the inference FLOPs per real token."""
    model.eval()
    model.reset_routing_counters()
    correct, loss_sum, flops, tokens = 0, 0.0, 0.0, 0
    for input_ids, attention_mask, labels in data.batches(batch_size):
        logits = model(input_ids, attention_mask)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        if flop_counter is not None:
            flops += flop_counter.count(attention_mask, training=False).total
            tokens += int(attention_mask.sum())
    result = {"accuracy": correct / len(data), "loss": loss_sum / len(data)}
    if flop_counter is not None:
        result["inference_flops_per_token"] = flops / max(tokens, 1)
    if model.num_experts > 1:
        routed, tokens, _ = model.routing_counts()
        result["expert_load"] = (routed / tokens.clamp_min(1).unsqueeze(1)).tolist()
    return result


def evaluate_tiers(model: MoEClassifier, method: FederatedMethod, state: ServerState, data: TokenizedDataset,
                   budgets: list[float], batch_size: int, flop_counter: FlopCounter | None = None) -> dict[float, dict]:
    """{budget: evaluate(...)}, evaluating tiers that hold identical models once."""
    done: dict = {}
    results = {}
    for budget in budgets:
        key = method.eval_key(budget)
        if key not in done:
            model.load_trainable_state(method.eval_params(state, budget))
            method.setup_eval(model, budget)
            try:
                done[key] = evaluate(model, data, batch_size, flop_counter)
            finally:
                method.teardown_eval(model, budget)
        results[budget] = done[key]
    return results
