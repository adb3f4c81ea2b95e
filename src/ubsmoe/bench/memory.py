"""``ubsmoe bench memory``: what one UB-SMoE local step holds beyond the frozen weights, at K = 2 and K = 8.

A random OLMoE-shaped checkpoint (64 experts per layer, top-8, float32) is written to a temporary folder
and read as a native MoE. For each K a fresh process builds the model, sets it up as a UB-SMoE client of
that K (DMR and the pseudo-gradient on), and runs local steps (causal-LM loss on random tokens, AdamW);
a thread samples its private resident memory (``RssAnon``) every 2 ms, with glibc's mmap threshold fixed
(``MMAP_THRESHOLD``) so that freed activations leave the resident set. ``extra`` is the peak during the
first step above the memory after building (the frozen weights, the adapters, the optimiser not yet):
activations, saved tensors and gradients. ``step_seconds`` is the median of the later steps.

Beside them, each run records what explains them: the bytes autograd saved for the backward in the first
step (distinct storages, the model's parameters and buffers left out), the gradients' and AdamW moments' bytes, and the step's
counted FLOPs (``FlopCounter``). Saved bytes are a + b K (per-slot tensors grow with K; attention, norms,
the router and the pseudo-gradient's factor products do not), so the two runs give a and b; the FLOP ratio
is the step-time ratio a perfectly efficient step would reach.

The JSON holds ``extra_memory_ratio`` and ``step_time_ratio`` (K = 2 over K = 8); the goals are at most
0.5 and 0.45.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ubsmoe.bench.native_load import write_checkpoint



MMAP_THRESHOLD = 128 * 1024
"""glibc's initial mmap threshold, fixed for the measured processes. By default glibc raises it (up to 32 MiB)
whenever a large block is freed, after which blocks of activation size come from its heap and stay in the
resident set once freed; the peak RSS then counts memory the step no longer holds. Fixed, every tensor of
128 KiB or more is its own mapping, returned when freed, and the RSS follows the live tensors."""


def measure(folder: Path, k: int, batch: int, length: int, steps: int, threads: int, checkpointing: bool) -> dict:
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run([sys.executable, "-m", "ubsmoe.bench.memory_step", str(folder), str(k), str(batch),
                           str(length), str(steps), str(threads), str(int(checkpointing))], capture_output=True,
                          text=True, timeout=3600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the K = {k} step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out: Path, layers: int = 8, experts: int = 64, hidden: int = 1024, expert_width: int = 512,
        vocab: int = 1024, batch: int = 8, length: int = 256, steps: int = 4, threads: int = 2,
        ks: tuple[int, int] = (2, 8), checkpointing: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="ubsmoe-memory-") as tmp:
        folder = Path(tmp)
        disk = write_checkpoint(folder, layers, experts, hidden, expert_width, vocab)
        runs = {str(k): measure(folder, k, batch, length, steps, threads, checkpointing) for k in ks}
    low, high = (runs[str(k)] for k in ks)
    median = lambda r: statistics.median(r["step_seconds"][1:] or r["step_seconds"])  # noqa: E731
    per_k = (high["saved_bytes"] - low["saved_bytes"]) / (ks[1] - ks[0])  # saved bytes = a + b K
    result = {
        "command": f"ubsmoe bench memory --batch-size {batch} --max-length {length} --threads {threads}"
                   + (" --activation-checkpointing" if checkpointing else "") + f" --out {out}",
        "activation_checkpointing": checkpointing,
        "shape": {"layers": layers, "experts": experts, "hidden": hidden, "expert_width": expert_width,
                  "vocab": vocab, "dtype": "float32", "batch": batch, "length": length, "threads": threads},
        "malloc_mmap_threshold": MMAP_THRESHOLD,
        "checkpoint_bytes": disk,
        "runs": runs,
        "saved_bytes_per_k": per_k,
        "saved_bytes_without_k": low["saved_bytes"] - per_k * ks[0],
        "extra_memory_ratio": low["extra"] / high["extra"],
        "step_time_ratio": median(low) / median(high),
        "train_flop_ratio": low["train_flops"]["total"] / high["train_flops"]["total"],
        "goals": {"extra_memory_ratio": 0.5, "step_time_ratio": 0.45},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    mib = 2**20
    verdict = lambda key: "met" if result[key] <= result["goals"][key] else "not met"  # noqa: E731
    flop_parts = ", ".join(f"{part} {low['train_flops'][part] / 1e9:.3g} / {high['train_flops'][part] / 1e9:.3g}"
                           for part in ("attention", "experts", "lora", "router", "hooks", "head"))
    out.with_suffix(".md").write_text(
        f"# Memory of a local step at K = {ks[0]} and K = {ks[1]}\n\nMade by `{result['command']}`: a random "
        f"OLMoE-shaped model ({layers} layers, {experts} experts of width {expert_width}, hidden {hidden}, "
        f"float32; {disk / mib:.0f} MiB of weights), one UB-SMoE client step (DMR, pseudo-gradient, AdamW) on "
        f"{batch} x {length} tokens, {threads} threads"
        + (", every attention block recomputed in the backward (`train.activation_checkpointing`)" if checkpointing else "")
        + ". Memory above what the built model holds, peak of the "
        "first step (RssAnon, sampled every 2 ms, glibc's mmap threshold fixed at 128 KiB so that freed "
        "activations leave the resident set); time, median of the later steps.\n\n"
        "| K | memory above the model (MiB) | saved for the backward (MiB) | step (s) | training GFLOPs |\n"
        "|---|---|---|---|---|\n"
        + "".join(f"| {k} | {runs[str(k)]['extra'] / mib:.0f} | {runs[str(k)]['saved_bytes'] / mib:.0f} | "
                  f"{median(runs[str(k)]):.2f} | {runs[str(k)]['train_flops']['total'] / 1e9:.3g} |\n" for k in ks)
        + f"\nextra_memory_ratio (K = {ks[0]} over K = {ks[1]}): {result['extra_memory_ratio']:.2f} (goal <= 0.5: "
          f"{verdict('extra_memory_ratio')}); step_time_ratio: {result['step_time_ratio']:.2f} (goal <= 0.45: "
          f"{verdict('step_time_ratio')}).\n"
        + "\nWhat explains them:\n"
        f"- Saved for the backward: {result['saved_bytes_without_k'] / mib:.0f} MiB + {per_k / mib:.0f} MiB x K. "
        "The per-slot tensors of the experts grow with K; attention's queries, keys, values and output, the "
        "norms' inputs, the router's and the LoRA's inputs and x A_e of every expert (the pseudo-gradient's) do not.\n"
        f"- {low['gradient_and_adam_bytes'] / mib:.0f} MiB at any K are the gradients and AdamW's two moments of "
        "every trained tensor: the pseudo-gradient gives every expert's LoRA a gradient.\n"
        f"- The saved tensors alone give a ratio of {low['saved_bytes'] / high['saved_bytes']:.2f}: (a + {ks[0]} b) / "
        f"(a + {ks[1]} b) reaches 0.5 only when the part that does not depend on K is at most "
        f"{(ks[1] - 2 * ks[0])} b = {(ks[1] - 2 * ks[0]) * per_k / mib:.0f} MiB; here it is "
        f"{result['saved_bytes_without_k'] / mib:.0f} MiB, the dense transformer's own activations.\n"
        f"- Counted training FLOPs at K = {ks[0]} are {result['train_flop_ratio']:.2f} of K = {ks[1]}'s (GFLOPs, "
        f"K = {ks[0]} / K = {ks[1]}: {flop_parts}): attention, the router and the pseudo-gradient's factor "
        "products cost the same at any K, so a step-time ratio below this asks the low tier to run faster per FLOP "
        "than the top tier.\n")
    return result
