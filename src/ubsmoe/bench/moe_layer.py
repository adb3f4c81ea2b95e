"""``ubsmoe bench moe-layer``: forward+backward of one upcycled FFN layer against the dense FFN.

MiniLM sizes (d = 384, h = 1536), 2,048 tokens, fp32, rank-8 LoRA on every expert matrix (the dense
FFN gets the same LoRA), frozen base weights. Speed-up = dense time / MoE time; the ideal is M / K.
Two layouts of the same FFN: every expert routed (MiniLM's default), and an always-on shared part of
S = 1 expert slot beside M - 1 routed experts (``model.shared_experts``, SmolLM2's default), where a
client of K_c experts runs the shared part and K_c - 1 routed ones, so the ideal is M / K_c as well.
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
from ubsmoe.model.shared_expert import UpcycledSharedMoE
from ubsmoe.model.upcycle import DenseFFN, centroid_router, split_ffn, upcycled_parts


def _dense_ffn(d: int, h: int, g: torch.Generator) -> DenseFFN:
    return DenseFFN(torch.randn(d, h, generator=g) / d**0.5, torch.randn(h, d, generator=g) / h**0.5, F.gelu,
                    b_up=torch.randn(h, generator=g) * 0.02, b_down=torch.randn(d, generator=g) * 0.02)


def _random_b(layer: torch.nn.Module, g: torch.Generator) -> None:
    """Non-zero B, so that every LoRA product is really computed and differentiated."""
    for name, p in layer.named_parameters():
        if name.endswith("_b"):
            p.data.normal_(0, 0.02, generator=g)


def build_layers(d: int, h: int, num_experts: int, rank: int, seed: int) -> tuple[SparseMoEFFN, SparseMoEFFN]:
    """(dense FFN with LoRA, its upcycled M-expert version) from one random GELU FFN."""
    g = torch.Generator().manual_seed(seed)
    dense = _dense_ffn(d, h, g)
    split = split_ffn(dense, num_experts, seed=seed)
    moe = SparseMoEFFN(split.w_up, split.w_down, F.gelu, b_up=split.b_up, b_down=split.b_down,
                       router_weight=centroid_router(dense, split), lora_rank=rank, generator=g)
    single = SparseMoEFFN(dense.w_up[None], dense.w_down[None], F.gelu, b_up=dense.b_up[None], b_down=dense.b_down,
                          lora_rank=rank, generator=g)
    for layer in (moe, single):
        _random_b(layer, g)
    return single, moe


def build_shared_layer(d: int, h: int, num_experts: int, rank: int, seed: int) -> UpcycledSharedMoE:
    """The same random FFN (``build_layers``' seed) upcycled with one shared expert slot beside M - 1 routed
    experts, the shared part chosen and the router calibrated on 512 random inputs."""
    g = torch.Generator().manual_seed(seed)
    dense = _dense_ffn(d, h, g)
    calibration = torch.randn(512, d, generator=torch.Generator().manual_seed(seed + 2))
    parts = upcycled_parts(dense, num_experts, 1, calibration, "calibrated", seed)
    routed = SparseMoEFFN(parts["w_up"], parts["w_down"], F.gelu, b_up=parts["b_up"], router_weight=parts["router"],
                          lora_rank=rank, generator=g)
    shared = SparseMoEFFN(parts["shared.w_up"], parts["shared.w_down"], F.gelu, b_up=parts["shared.b_up"],
                          b_down=parts["shared.b_down"], lora_rank=rank, generator=g)
    layer = UpcycledSharedMoE(routed, shared)
    _random_b(layer, g)
    return layer


def run(out: Path, tokens: int = 2048, d: int = 384, h: int = 1536, num_experts: int = 8,
        ks: tuple[int, ...] = (1, 2, 4, 8), pg_k: int = 2, rank: int = 8, repeats: int = 31, threads: int = 2, seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    dense, moe = build_layers(d, h, num_experts, rank, seed)
    shared = build_shared_layer(d, h, num_experts, rank, seed)
    x = torch.randn(1, tokens, d, generator=torch.Generator().manual_seed(seed + 1))
    grad = torch.randn_like(x)

    pseudo_gradient = PseudoGradient(rho=1 - pg_k / num_experts)

    def step(layer: SparseMoEFFN | UpcycledSharedMoE, k: int, pg: bool = False):
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
            elif layer is shared:
                layer.routed.set_top_k(k - 1)  # K_c counts the shared slot
            once()
            start = time.perf_counter()
            once()
            return time.perf_counter() - start
        return fn

    candidates = ({"dense": step(dense, 1)} | {f"k{k}": step(moe, k) for k in ks}
                  | {f"k{pg_k}+pg": step(moe, pg_k, pg=True)} | {f"shared k{k}": step(shared, k) for k in ks})
    medians = interleaved_medians(candidates, repeats)
    moe.hooks = []

    def rows_of(prefix: str) -> list[dict]:
        rows = []
        for k in ks:
            speedup = medians["dense"] / medians[f"{prefix}k{k}"]
            rows.append({"k": k, "median_s": medians[f"{prefix}k{k}"], "speedup": speedup,
                         "ideal_speedup": num_experts / k, "fraction_of_ideal": speedup / (num_experts / k)})
        return rows

    result = {"benchmark": "moe-layer", "tokens": tokens, "d_model": d, "d_ffn": h, "num_experts": num_experts,
              "lora_rank": rank, "threads": threads, "repeats": repeats, "dense_median_s": medians["dense"],
              "torch": torch.__version__, "rows": rows_of(""), "shared_rows": rows_of("shared "),
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
        f"Made by `ubsmoe bench moe-layer --threads {result['threads']} --out benchmarks/moe_layer.json`.",
        "",
        f"Dense FFN (same LoRA): {result['dense_median_s'] * 1e3:.1f} ms (median of {result['repeats']})",
    ]
    layouts = [("Every expert routed (MiniLM's default)", "rows"),
               ("A shared part of S = 1 slot beside M - 1 routed experts (SmolLM2's default): K counts the shared "
                "slot", "shared_rows")]
    for title, key in layouts:
        if key not in result:  # files made before the shared layout was measured
            continue
        lines += ["", f"{title}:", "", "| K | median ms | speed-up | ideal M/K | fraction of ideal |",
                  "|---|---|---|---|---|"]
        for row in result[key]:
            lines.append(f"| {row['k']} | {row['median_s'] * 1e3:.1f} | {row['speedup']:.2f} | "
                         f"{row['ideal_speedup']:.1f} | {row['fraction_of_ideal']:.0%} |")
    lines += ["", "Goal: at K = 2 of 8, at least 75% of the ideal speed-up."]
    for title, key in layouts:
        row = next((r for r in result.get(key, []) if r["k"] == 2), None)
        if row is not None:
            verdict = "met" if row["fraction_of_ideal"] >= 0.75 else "not met"
            lines.append(f"- {title.split(' (')[0]}: {row['fraction_of_ideal']:.0%}: {verdict}")
    pg = result["pseudo_gradient"]
    lines += ["", f"With the Universal Pseudo-Gradient at K={pg['k']}: {pg['median_s'] * 1e3:.1f} ms, "
                  f"{pg['overhead']:+.0%} against the same K without it."]
    return "\n".join(lines) + "\n"
