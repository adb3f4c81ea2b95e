"""How far Dynamic Modulated Routing's target can balance the low tier, on the upcycled router's real scores.

    ubsmoe bench dmr-reach --out benchmarks/dmr_reach.json

Routes real BBC News training tokens through the default upcycled MiniLM (calibrated routers, before
training), then, per layer and on the router scores alone (no training), iterates the server's target
phi <- zeta phi + (1 - zeta) tanh(u* / (u + eps) - 1) (zeta = 0.5) to its fixed point (SPEC section 4; N_p = M here) and
reports the low tier's (K = 2) load CV:
- "none": phi = 0 (plain top-K);
- "mixed tiers": u and u* pooled over the four default tiers K in {2, 4, 6, 8} with equal data, as the
  server sees them;
- "low tier alone": u and u* from K = 2 clients only (what DMR would do without the dilution by
  clients that activate most experts);
- "balancing bias": the per-expert offset that balances K = 2 completely (found by sign updates), and
  the spread max - min it needs, against the target's range tanh(-1) .. tanh(u*/eps - 1) < 1.76.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from ubsmoe.config import load_config
from ubsmoe.engine.experiment import build_experiment


def load(scores: torch.Tensor, phi: torch.Tensor, k: int) -> torch.Tensor:
    """Share of tokens routed to each expert (E,) by top-k of scores + phi; scores: (T, E)."""
    chosen = (scores + phi).topk(k, dim=1).indices
    return torch.bincount(chosen.reshape(-1), minlength=scores.shape[1]).double() / scores.shape[0]


def cv(shares: torch.Tensor) -> float:
    return float(shares.std(unbiased=False) / shares.mean())


def fixed_point(scores: torch.Tensor, ks: list[int], zeta: float = 0.5, iterations: int = 60, eps: float = 1e-6
                ) -> torch.Tensor:
    """phi after repeating the server's step phi <- zeta phi + (1 - zeta) target with equal-data clients at
    each K in ``ks`` (clients' local learning of phi left out)."""
    phi = torch.zeros(scores.shape[1], dtype=scores.dtype)
    target_usage = statistics.mean(ks) / scores.shape[1]
    for _ in range(iterations):
        usage = torch.stack([load(scores, phi, k) for k in ks]).mean(0)
        phi = zeta * phi + (1 - zeta) * torch.tanh(target_usage / (usage + eps) - 1).to(scores.dtype)
    return phi


def balancing_bias(scores: torch.Tensor, k: int, steps: int = 400, rate: float = 0.02) -> torch.Tensor:
    bias = torch.zeros(scores.shape[1], dtype=scores.dtype)
    for _ in range(steps):
        shares = load(scores, bias, k)
        bias += rate * torch.sign(shares.mean() - shares)
    return bias


def run(out: Path, texts: int = 256, threads: int = 2) -> dict:
    """Route ``texts`` training texts, write ``out`` (JSON) and the markdown table beside it."""
    exp = build_experiment(load_config(overrides=[f"data.max_train_samples={texts}", "data.max_test_samples=16",
                                                  f"threads={threads}"], method="smoe"))
    model = exp.model
    model.eval()
    model.set_top_k(2)
    scores: list[list[torch.Tensor]] = [[] for _ in model.moe_layers]
    with torch.inference_mode():
        for input_ids, attention_mask, _ in exp.train.batches(32):
            model(input_ids, attention_mask)
            for i, layer in enumerate(model.moe_layers):
                scores[i].append(layer.last_routing.scores.double())
    layers = []
    for i, chunks in enumerate(scores):
        s = torch.cat(chunks)
        mixed, alone, bias = fixed_point(s, [2, 4, 6, 8]), fixed_point(s, [2]), balancing_bias(s, 2)
        layers.append({
            "layer": i, "tokens": s.shape[0], "score_std": float(s.std()),
            "expert_mean_score_spread": float(s.mean(0).max() - s.mean(0).min()),
            "k2_cv": {"none": cv(load(s, torch.zeros_like(mixed), 2)), "mixed_tiers": cv(load(s, mixed, 2)),
                      "low_tier_alone": cv(load(s, alone, 2)), "balancing_bias": cv(load(s, bias, 2))},
            "phi_spread": {"mixed_tiers": float(mixed.max() - mixed.min()), "low_tier_alone": float(alone.max() - alone.min()),
                           "balancing_bias": float(bias.max() - bias.min())},
        })
    mean = lambda key, sub: statistics.mean(layer[key][sub] for layer in layers)  # noqa: E731
    result = {"layers": layers,
              "mean_k2_cv": {k: mean("k2_cv", k) for k in layers[0]["k2_cv"]},
              "mean_phi_spread": {k: mean("phi_spread", k) for k in layers[0]["phi_spread"]}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    lines = ["# Reach of DMR's target on the low tier (K = 2 of 8), upcycled MiniLM before training", "",
             "| layer | score std | K=2 CV, no phi | mixed tiers | low tier alone | balancing bias | "
             "phi spread: mixed | low alone | needed |", "|---|---|---|---|---|---|---|---|---|"]
    for layer in layers:
        c, p = layer["k2_cv"], layer["phi_spread"]
        lines.append(f"| {layer['layer']} | {layer['score_std']:.2f} | {c['none']:.3f} | {c['mixed_tiers']:.3f} "
                     f"| {c['low_tier_alone']:.3f} | {c['balancing_bias']:.3f} | {p['mixed_tiers']:.2f} "
                     f"| {p['low_tier_alone']:.2f} | {p['balancing_bias']:.2f} |")
    m, s = result["mean_k2_cv"], result["mean_phi_spread"]
    lines.append(f"| mean | | {m['none']:.3f} | {m['mixed_tiers']:.3f} | {m['low_tier_alone']:.3f} "
                 f"| {m['balancing_bias']:.3f} | {s['mixed_tiers']:.2f} | {s['low_tier_alone']:.2f} "
                 f"| {s['balancing_bias']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return result
