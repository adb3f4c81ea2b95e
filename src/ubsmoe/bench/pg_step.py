"""``ubsmoe bench pg-step``: the cost of the Universal Pseudo-Gradient in a whole local training step.

The default backbone (upcycled MiniLM, M = 8), a batch of real BBC News training texts, the client's
top-K = 2: one UB-SMoE step (forward, loss with the range regulariser, backward, pseudo-gradients,
AdamW) with PG against the same step without it, interleaved in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ubsmoe.bench.timing import interleaved_medians
from ubsmoe.config import load_config
from ubsmoe.engine.local_training import local_step
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.methods.base import ClientSettings, top_k_for_budget
from ubsmoe.methods.ubsmoe import UBSMoE, UBSMoEOptions


def run(out: Path, budget: float = 0.25, batch_size: int = 16, max_length: int = 128, repeats: int = 15,
        threads: int = 2, seed: int = 0) -> dict:
    config = load_config(overrides=[f"threads={threads}", f"seed={seed}", f"model.max_length={max_length}",
                                    "data.max_train_samples=256", "data.max_test_samples=16"], method="ubsmoe")
    exp = build_experiment(config)
    model = exp.model
    k_max = exp.method.k_max
    settings = ClientSettings(top_k=top_k_for_budget(k_max, budget))  # a training client of this budget
    batch = exp.train.batch(torch.arange(batch_size))
    attention_mask = batch[1]
    params = [p for p in model.parameters() if p.requires_grad]

    def step_fn(pg: bool):
        method = UBSMoE(UBSMoEOptions(pg=pg), k_max=k_max)

        def fn():
            method.setup_client(model, settings)
            model.train()
            local_step(model, exp.task, method, batch, torch.optim.AdamW(params, lr=0.0))  # lr 0: the model stays put
            method.teardown_client(model)
        return fn

    model.load_trainable_state(exp.method.initial_state(model).params)
    medians = interleaved_medians({"without_pg": step_fn(False), "with_pg": step_fn(True)}, repeats)
    k = top_k_for_budget(k_max, budget)
    result = {"benchmark": "pg-step", "backbone": config.model.backbone, "num_experts": model.num_experts,
              "top_k": k, "budget": budget, "batch_size": batch_size, "max_length": max_length,
              "tokens": int(attention_mask.sum()), "threads": threads, "repeats": repeats,
              "torch": torch.__version__, "without_pg_s": medians["without_pg"], "with_pg_s": medians["with_pg"],
              "overhead": medians["with_pg"] / medians["without_pg"] - 1}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    return "\n".join([
        f"# Universal Pseudo-Gradient: cost in one local step ({result['backbone']}, M={result['num_experts']}, "
        f"K={result['top_k']}, batch {result['batch_size']} x {result['max_length']} tokens, "
        f"{result['threads']} threads)",
        "",
        "| step | median ms |",
        "|---|---|",
        f"| UB-SMoE without PG | {result['without_pg_s'] * 1e3:.1f} |",
        f"| UB-SMoE with PG | {result['with_pg_s'] * 1e3:.1f} |",
        "",
        f"Overhead of PG: {result['overhead']:+.1%} (goal: at most +15%).",
    ]) + "\n"
