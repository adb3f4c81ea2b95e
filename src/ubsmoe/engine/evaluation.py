"""Per-tier evaluation: each tier runs the model a client of that budget holds, on the same test set.

The task scores the model; the engine counts what every evaluation shares: inference FLOPs per real
token and each layer's expert load.
"""

from __future__ import annotations

from collections.abc import Sized

import torch

from ubsmoe.engine.run_records import TierScore
from ubsmoe.methods.base import FederatedMethod, ServerState
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.model import MoEModel
from ubsmoe.tasks import Task


def evaluate(model: MoEModel, task: Task, data: Sized, batch_size: int,
             flop_counter: FlopCounter | None = None) -> TierScore:
    """The task's scores (accuracy, loss and its details by name) of the model as it is configured now,
    per-layer expert load (L, E), and with a counter the inference FLOPs per real token."""
    model.eval()
    model.reset_routing_counters()
    flops, tokens = 0.0, 0

    def count(attention_mask: torch.Tensor) -> None:
        nonlocal flops, tokens
        flops += flop_counter.count(attention_mask, training=False).total
        tokens += int(attention_mask.sum())

    scores = task.evaluate(model, data, batch_size, count if flop_counter is not None else None)
    result = TierScore(scores.accuracy, scores.loss, dict(scores.details or {}))
    if flop_counter is not None:
        result.inference_flops_per_token = flops / max(tokens, 1)
    if model.num_experts > 1:
        routed, tokens_seen, _ = model.routing_counts()
        result.expert_load = (routed / tokens_seen.clamp_min(1).unsqueeze(1)).tolist()
    return result


def setup_tier(model: MoEModel, method: FederatedMethod, state: ServerState, budget: float) -> None:
    """Configure ``model`` as a client of tier ``budget`` holds it, from the server's state: the frozen
    weights the method changed, the tier's tensors and settings (``teardown_client`` undoes the settings)."""
    method.sync_frozen(model, method.frozen_state(state))
    settings = method.eval_settings(state, budget)
    model.load_trainable_state(method.start_params(model, method.eval_params(state, budget), settings))
    method.setup_client(model, settings)


def evaluate_tiers(model: MoEModel, task: Task, method: FederatedMethod, state: ServerState, data: Sized,
                   budgets: list[float], batch_size: int, flop_counter: FlopCounter | None = None
                   ) -> dict[float, TierScore]:
    """{budget: evaluate(...)}, evaluating tiers that hold identical models once: the server's side, with
    the same records a client receives (the tier's tensors and settings, the frozen-weight state)."""
    done: dict = {}
    results = {}
    for budget in budgets:
        key = method.eval_key(budget)
        if key not in done:
            setup_tier(model, method, state, budget)
            try:
                done[key] = evaluate(model, task, data, batch_size, flop_counter)
            finally:
                method.teardown_client(model)
        results[budget] = done[key]
    return results
