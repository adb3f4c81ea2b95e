"""``ubsmoe bench memory``: what one UB-SMoE local step holds beyond the frozen weights, at K = 2 and K = 8.

A random OLMoE-shaped checkpoint (64 experts per layer, top-8, float32) is written to a temporary folder
and read as a native MoE. For each K a fresh process builds the model, sets it up as a UB-SMoE client of
that K (DMR and the pseudo-gradient on), and runs local steps (causal-LM loss on random tokens, AdamW);
a thread samples its private resident memory (``RssAnon``) every 2 ms. ``extra`` is the peak during the
first step above the memory after building (the frozen weights, the adapters, the optimiser not yet):
activations, saved tensors and gradients. ``step_seconds`` is the median of the later steps.

The JSON holds ``extra_memory_ratio`` and ``step_time_ratio`` (K = 2 over K = 8); the goals are at most
0.5 and 0.45.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from ubsmoe.bench.native_load import write_checkpoint

STEP = r"""
import json, sys, threading, time
import torch
import torch.nn.functional as F

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024

folder, k, batch, length, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
from ubsmoe.methods.base import get_method
from ubsmoe.model import ModelSpec, build_model
from ubsmoe.tasks.causal_lm import language_model_head

model = build_model(ModelSpec(backbone=folder, lora_rank=8), language_model_head(folder))
method_cls = get_method("ubsmoe")
method = method_cls(method_cls.Options(), k_max=8)
method.prepare_model(model)
settings = method.tier_settings(k / 8)
assert settings.top_k == k, settings
method.setup_client(model, settings)
model.train()
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
generator = torch.Generator().manual_seed(0)
vocab = model.head.weight.shape[0]
base = anon()
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
times = []
for step in range(steps):
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    mask = torch.ones_like(ids)
    positions = torch.ones_like(ids, dtype=torch.bool)
    positions[:, -1] = False
    if step == 0:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
    start = time.perf_counter()
    logits = model(ids, mask, positions=positions)
    loss = F.cross_entropy(logits, ids[:, 1:].reshape(-1))
    extra = method.local_loss(model)
    optimizer.zero_grad(set_to_none=True)
    (loss if extra is None else loss + extra).backward()
    method.after_backward(model)
    optimizer.step()
    times.append(time.perf_counter() - start)
    if step == 0:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], anon())
trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
print(json.dumps({"k": k, "after_build": base, "peak_first_step": peak[0], "extra": peak[0] - base,
                  "gradient_and_adam_bytes": 3 * trained, "step_seconds": times}))
"""


def measure(folder: Path, k: int, batch: int, length: int, steps: int, threads: int) -> dict:
    done = subprocess.run([sys.executable, "-c", STEP, str(folder), str(k), str(batch), str(length), str(steps),
                           str(threads)], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"the K = {k} step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out: Path, layers: int = 8, experts: int = 64, hidden: int = 1024, expert_width: int = 512,
        vocab: int = 1024, batch: int = 4, length: int = 128, steps: int = 4, threads: int = 2,
        ks: tuple[int, int] = (2, 8)) -> dict:
    with tempfile.TemporaryDirectory(prefix="ubsmoe-memory-") as tmp:
        folder = Path(tmp)
        disk = write_checkpoint(folder, layers, experts, hidden, expert_width, vocab)
        runs = {str(k): measure(folder, k, batch, length, steps, threads) for k in ks}
    low, high = (runs[str(k)] for k in ks)
    median = lambda r: statistics.median(r["step_seconds"][1:] or r["step_seconds"])  # noqa: E731
    result = {
        "command": f"ubsmoe bench memory --out {out}",
        "shape": {"layers": layers, "experts": experts, "hidden": hidden, "expert_width": expert_width,
                  "vocab": vocab, "dtype": "float32", "batch": batch, "length": length, "threads": threads},
        "checkpoint_bytes": disk,
        "runs": runs,
        "extra_memory_ratio": low["extra"] / high["extra"],
        "step_time_ratio": median(low) / median(high),
        "goals": {"extra_memory_ratio": 0.5, "step_time_ratio": 0.45},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    mib = 2**20
    verdict = lambda key: "met" if result[key] <= result["goals"][key] else "not met"  # noqa: E731
    out.with_suffix(".md").write_text(
        f"# Memory of a local step at K = {ks[0]} and K = {ks[1]}\n\nMade by `{result['command']}`: a random "
        f"OLMoE-shaped model ({layers} layers, {experts} experts of width {expert_width}, hidden {hidden}, "
        f"float32; {disk / mib:.0f} MiB of weights), one UB-SMoE client step (DMR, pseudo-gradient, AdamW) on "
        f"{batch} x {length} tokens, {threads} threads. Memory above what the built model holds, peak of the "
        "first step (RssAnon, sampled every 2 ms); time, median of the later steps.\n\n"
        "| K | memory above the model (MiB) | step (s) |\n|---|---|---|\n"
        + "".join(f"| {k} | {runs[str(k)]['extra'] / mib:.0f} | {median(runs[str(k)]):.2f} |\n" for k in ks)
        + f"\nOf the memory above the model, {low['gradient_and_adam_bytes'] / mib:.0f} MiB at any K are the gradients and "
          "AdamW's two moments of every trained tensor: the pseudo-gradient gives every expert's LoRA a gradient.\n"
        + f"\nextra_memory_ratio (K = {ks[0]} over K = {ks[1]}): {result['extra_memory_ratio']:.2f} (goal <= 0.5: "
          f"{verdict('extra_memory_ratio')}); step_time_ratio: {result['step_time_ratio']:.2f} (goal <= 0.45: "
          f"{verdict('step_time_ratio')}).\n")
    return result
