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


def measure(*args: str | int | float) -> dict:
    """One ``memory_step`` process (its arguments), with glibc's mmap threshold fixed; its JSON line."""
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    done = subprocess.run([sys.executable, "-m", "ubsmoe.bench.memory_step", *map(str, args)], capture_output=True,
                          text=True, timeout=3600, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the step {' '.join(map(str, args[:2]))} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def median_step(run: dict) -> float:
    """Median seconds of a run's steps after the first (which pays for the allocations and the sampling)."""
    return statistics.median(run["step_seconds"][1:] or run["step_seconds"])


def run(out: Path, layers: int = 8, experts: int = 64, hidden: int = 1024, expert_width: int = 512,
        vocab: int = 1024, batch: int = 8, length: int = 256, steps: int = 4, threads: int = 2,
        ks: tuple[int, int] = (2, 8), checkpointing: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="ubsmoe-memory-") as tmp:
        folder = Path(tmp)
        disk = write_checkpoint(folder, layers, experts, hidden, expert_width, vocab)
        kept, runs = {}, {}
        for k in ks:  # with checkpointing, each K also runs with the attention kept, just before: its cost
            if checkpointing:
                kept[str(k)] = measure("native", folder, k, batch, length, steps, threads, 0)
            runs[str(k)] = measure("native", folder, k, batch, length, steps, threads, int(checkpointing))
    low, high = (runs[str(k)] for k in ks)
    median = median_step
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
        "goals": {"extra_memory_ratio": 0.45 if checkpointing else 0.5, "step_time_ratio": 0.45},
    }
    if checkpointing:
        result["kept"] = kept
        result["recomputation"] = {k: {"extra_memory": runs[k]["extra"] / kept[k]["extra"],
                                       "step_time": median(runs[k]) / median(kept[k])} for k in runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(to_markdown(result, ks))
    return result


def to_markdown(result: dict, ks: tuple[int, int]) -> str:
    mib = 2**20
    runs, shape, goals = result["runs"], result["shape"], result["goals"]
    low, high = (runs[str(k)] for k in ks)
    per_k, without_k = result["saved_bytes_per_k"], result["saved_bytes_without_k"]
    verdict = lambda key: "met" if result[key] <= goals[key] else "not met"  # noqa: E731
    flop_parts = ", ".join(f"{part} {low['train_flops'][part] / 1e9:.3g} / {high['train_flops'][part] / 1e9:.3g}"
                           for part in ("attention", "experts", "lora", "router", "hooks", "head"))
    goal = goals["extra_memory_ratio"]
    # (a + k0 b) / (a + k1 b) <= goal  <=>  a <= (goal k1 - k0) b / (1 - goal)
    allowed = (goal * ks[1] - ks[0]) / (1 - goal)
    checkpointing = result["activation_checkpointing"]
    lines = [
        f"# Memory of a local step at K = {ks[0]} and K = {ks[1]}", "",
        f"Made by `{result['command']}`: a random OLMoE-shaped model ({shape['layers']} layers, {shape['experts']} "
        f"experts of width {shape['expert_width']}, hidden {shape['hidden']}, float32; "
        f"{result['checkpoint_bytes'] / mib:.0f} MiB of weights), one UB-SMoE client step (DMR, pseudo-gradient, "
        f"AdamW) on {shape['batch']} x {shape['length']} tokens, {shape['threads']} threads"
        + (", with `train.activation_checkpointing`: every attention block and the norm in front of it recomputed in "
           "the backward (the experts, too large to merge, keep no merged weights anyway)" if checkpointing else "")
        + ". Memory above what the built model holds, peak of the first step (RssAnon, sampled every 2 ms, glibc's "
        "mmap threshold fixed at 128 KiB so that freed activations leave the resident set); time, median of the "
        "later steps.", "",
        "| K | memory above the model (MiB) | saved for the backward (MiB) | step (s) | training GFLOPs |",
        "|---|---|---|---|---|",
        *(f"| {k} | {runs[str(k)]['extra'] / mib:.0f} | {runs[str(k)]['saved_bytes'] / mib:.0f} | "
          f"{median_step(runs[str(k)]):.2f} | {runs[str(k)]['train_flops']['total'] / 1e9:.3g} |" for k in ks),
        "",
        f"extra_memory_ratio (K = {ks[0]} over K = {ks[1]}): {result['extra_memory_ratio']:.2f} (goal <= {goal:g}: "
        f"{verdict('extra_memory_ratio')}); step_time_ratio: {result['step_time_ratio']:.2f} (goal <= "
        f"{goals['step_time_ratio']:g}: {verdict('step_time_ratio')}).",
    ]
    if checkpointing:
        kept = result["kept"]
        lines += ["", "The same steps with the attention kept (each run just before its recomputed twin; the step times "
                  "of separate processes are only as steady as the machine):", "",
                  "| K | memory above the model, kept (MiB) | recomputed / kept: memory | recomputed / kept: step time |",
                  "|---|---|---|---|",
                  *(f"| {k} | {kept[str(k)]['extra'] / mib:.0f} | {result['recomputation'][str(k)]['extra_memory']:.2f} | "
                    f"{result['recomputation'][str(k)]['step_time']:.2f} |" for k in ks)]
    lines += [
        "", "What explains them:",
        f"- Saved for the backward: {without_k / mib:.0f} MiB + {per_k / mib:.0f} MiB x K. The per-slot tensors "
        "of the experts grow with K; "
        + ("the attention blocks' inputs" if checkpointing else "attention's queries, keys, values and output")
        + ", the norms' inputs, the router's and the LoRA's inputs and x A_e of every expert (the pseudo-gradient's) "
        "do not.",
        f"- {low['gradient_and_adam_bytes'] / mib:.0f} MiB at any K are the gradients and AdamW's two moments of "
        "every trained tensor: the pseudo-gradient gives every expert's LoRA a gradient.",
        f"- The saved tensors alone give a ratio of {low['saved_bytes'] / high['saved_bytes']:.2f}: (a + {ks[0]} b) / "
        f"(a + {ks[1]} b) reaches {goal:g} only when the part that does not depend on K is at most {allowed:.2g} b = "
        f"{allowed * per_k / mib:.0f} MiB; here it is {without_k / mib:.0f} MiB.",
        f"- Counted training FLOPs at K = {ks[0]} are {result['train_flop_ratio']:.2f} of K = {ks[1]}'s (GFLOPs, "
        f"K = {ks[0]} / K = {ks[1]}: {flop_parts}): attention, the router and the pseudo-gradient's factor "
        "products cost the same at any K, so a step-time ratio below this asks the low tier to run faster per FLOP "
        "than the top tier. The FLOPs leave out the recomputation.",
    ]
    return "\n".join(lines) + "\n"


def run_experiment(out: Path, backbone: str, budgets: tuple[float, ...] = (0.25, 1.0), batch: int = 8,
                   length: int = 256, steps: int = 3, threads: int = 2, overrides: tuple[str, ...] = ()) -> dict:
    """A UB-SMoE client of each budget on the experiment ``overrides`` describe (``backbone`` upcycled with
    its default shared experts; e.g. ``task=causal-lm data.dataset=commonsense:PATH``), with the attention
    kept and recomputed, each in its own process: the peak memory of a low-tier client's step with and
    without ``train.activation_checkpointing``."""
    settings = [f"model.backbone={backbone}", f"model.max_length={length}", *overrides]
    runs = []
    for budget in budgets:
        for checkpointing in (False, True):
            runs.append({"activation_checkpointing": checkpointing}
                        | measure("experiment", budget, batch, steps, threads, int(checkpointing), *settings))
    by = {(r["budget"], r["activation_checkpointing"]): r for r in runs}
    low, high = budgets[0], budgets[-1]
    result = {
        "command": f"ubsmoe bench memory --backbone {backbone} --batch-size {batch} --max-length {length} "
                   f"--threads {threads} --out {out}" + "".join(f" {item}" for item in overrides),
        "backbone": backbone, "batch": batch, "max_length": length, "threads": threads, "overrides": list(overrides),
        "malloc_mmap_threshold": MMAP_THRESHOLD, "runs": runs,
        "low_over_top": {str(c).lower(): by[low, c]["extra"] / by[high, c]["extra"] for c in (False, True)},
        "recomputed_over_kept": {str(b): {"extra_memory": by[b, True]["extra"] / by[b, False]["extra"],
                                          "peak": by[b, True]["peak_first_step"] / by[b, False]["peak_first_step"],
                                          "step_time": median_step(by[b, True]) / median_step(by[b, False])}
                                 for b in budgets},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(experiment_markdown(result))
    return result


def experiment_markdown(result: dict) -> str:
    mib = 2**20
    first = result["runs"][0]
    lines = [
        f"# Memory of a UB-SMoE client's step per tier, {result['backbone']}, with and without activation "
        "checkpointing", "",
        f"Made by `{result['command']}`: the first {result['batch']} training examples (padded to "
        f"{first['batch_shape'][1]} tokens, {first['tokens']} real), {first['shared_experts']} shared expert(s), "
        f"{result['threads']} threads, each run in its own process. `train.activation_checkpointing` recomputes every "
        "attention block with the norm in front of it and the experts' merged weights W + s A B in the backward. "
        "Memory above what the built model holds (its "
        "frozen weights and adapters), peak of the first step (RssAnon, sampled every 2 ms); peak: the whole "
        "process's private memory at that moment; time, median of the later steps.", "",
        "| budget | K | checkpointing | memory above the model (MiB) | saved for the backward (MiB) | peak (MiB) | step (s) |",
        "|---|---|---|---|---|---|---|",
        *(f"| {r['budget']:g} | {r['k']} | {'on' if r['activation_checkpointing'] else 'off'} | "
          f"{r['extra'] / mib:.0f} | {r['saved_bytes'] / mib:.0f} | {r['peak_first_step'] / mib:.0f} | "
          f"{median_step(r):.2f} |" for r in result["runs"]),
        "",
        "| budget | on / off: memory above the model | peak | step time (separate processes: only as steady as the machine) |",
        "|---|---|---|---|",
        *(f"| {b} | {v['extra_memory']:.2f} | {v['peak']:.2f} | {v['step_time']:.2f} |"
          for b, v in result["recomputed_over_kept"].items()),
        "",
        f"Lowest tier over the top tier, memory above the model: {result['low_over_top']['false']:.2f} without "
        f"checkpointing, {result['low_over_top']['true']:.2f} with it.",
    ]
    return "\n".join(lines) + "\n"
