"""``ubsmoe bench moe-layer``: forward+backward of one upcycled FFN layer against the dense FFN.

MiniLM sizes (d = 384, h = 1536), 2,048 tokens, fp32, rank-8 LoRA on every expert matrix (the dense
FFN gets the same LoRA), frozen base weights. Speed-up = dense time / MoE time; the ideal is M / K.
Also the cost of the Universal Pseudo-Gradient at K = 2: the same step with PG against without.
Candidates run in turn; in each turn a candidate runs twice and the second call is timed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ubsmoe.bench.timing import interleaved_medians
from ubsmoe.model.moe_layer import SparseMoEFFN
from ubsmoe.model.pseudo_gradient import PseudoGradient
from ubsmoe.model.upcycle import DenseFFN, centroid_router, split_ffn


def build_layers(d: int, h: int, num_experts: int, rank: int, seed: int) -> tuple[SparseMoEFFN, SparseMoEFFN]:
    """(dense FFN with LoRA, its upcycled M-expert version) from one random GELU FFN."""
    g = torch.Generator().manual_seed(seed)
    dense = DenseFFN(torch.randn(d, h, generator=g) / d**0.5, torch.randn(h, d, generator=g) / h**0.5, F.gelu,
                     b_up=torch.randn(h, generator=g) * 0.02, b_down=torch.randn(d, generator=g) * 0.02)
    split = split_ffn(dense, num_experts, seed=seed)
    moe = SparseMoEFFN(split.w_up, split.w_down, F.gelu, b_up=split.b_up, b_down=split.b_down,
                       router_weight=centroid_router(dense, split), lora_rank=rank, generator=g)
    single = SparseMoEFFN(dense.w_up[None], dense.w_down[None], F.gelu, b_up=dense.b_up[None], b_down=dense.b_down,
                          lora_rank=rank, generator=g)
    for layer in (moe, single):  # non-zero B so that every LoRA product is really computed and differentiated
        for name, p in layer.named_parameters():
            if name.endswith("_b"):
                p.data.normal_(0, 0.02, generator=g)
    return single, moe


def run(out: Path, tokens: int = 2048, d: int = 384, h: int = 1536, num_experts: int = 8,
        ks: tuple[int, ...] = (1, 2, 4, 8), pg_k: int = 2, rank: int = 8, repeats: int = 31, threads: int = 2, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    dense, moe = build_layers(d, h, num_experts, rank, seed)
    x = torch.randn(1, tokens, d, generator=torch.Generator().manual_seed(seed + 1))
    grad = torch.randn_like(x)

    pseudo_gradient = PseudoGradient(rho=1 - pg_k / num_experts)

    def step(layer: SparseMoEFFN, k: int, pg: bool = False):
        def once():
            inp = x.clone().requires_grad_(True)
            layer(inp).backward(grad)
            if pg:
                pseudo_gradient.apply(layer)
            for p in layer.parameters():
                p.grad = None

        def fn() -> float:
            # The first call after another candidate pays for the switch of shapes (allocator, caches):
            # it runs untimed, and the second call is the one measured.
            if layer is moe:
                layer.set_top_k(k)
            layer.hooks = [pseudo_gradient] if pg else []
            once()
            start = time.perf_counter()
            once()
            return time.perf_counter() - start
        return fn

    candidates = ({"dense": step(dense, 1)} | {f"k{k}": step(moe, k) for k in ks}
                  | {f"k{pg_k}+pg": step(moe, pg_k, pg=True)})
    medians = interleaved_medians(candidates, repeats)
    moe.hooks = []
    rows = []
    for k in ks:
        speedup = medians["dense"] / medians[f"k{k}"]
        rows.append({"k": k, "median_s": medians[f"k{k}"], "speedup": speedup, "ideal_speedup": num_experts / k,
                     "fraction_of_ideal": speedup / (num_experts / k)})
    result = {"benchmark": "moe-layer", "tokens": tokens, "d_model": d, "d_ffn": h, "num_experts": num_experts,
              "lora_rank": rank, "threads": threads, "repeats": repeats, "dense_median_s": medians["dense"],
              "torch": torch.__version__, "rows": rows,
              "pseudo_gradient": {"k": pg_k, "median_s": medians[f"k{pg_k}+pg"],
                                  "overhead": medians[f"k{pg_k}+pg"] / medians[f"k{pg_k}"] - 1}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(to_markdown(result))
    return result


def to_markdown(result: dict) -> str:
    lines = [
        f"# MoE layer: forward+backward, {result['tokens']} tokens, d={result['d_model']}, h={result['d_ffn']}, "
        f"M={result['num_experts']}, LoRA r={result['lora_rank']}, {result['threads']} threads",
        "",
        f"Dense FFN (same LoRA): {result['dense_median_s'] * 1e3:.1f} ms (median of {result['repeats']})",
        "",
        "| K | median ms | speed-up | ideal M/K | fraction of ideal |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['k']} | {row['median_s'] * 1e3:.1f} | {row['speedup']:.2f} | {row['ideal_speedup']:.1f} "
                     f"| {row['fraction_of_ideal']:.0%} |")
    pg = result["pseudo_gradient"]
    lines += ["", f"With the Universal Pseudo-Gradient at K={pg['k']}: {pg['median_s'] * 1e3:.1f} ms, "
                  f"{pg['overhead']:+.0%} against the same K without it."]
    return "\n".join(lines) + "\n"
