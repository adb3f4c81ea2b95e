"""``ubsmoe bench native-load``: peak memory of reading a native MoE checkpoint, against its size on disk.

A random OLMoE-shaped checkpoint (64 experts per layer, top-8) is written to a temporary folder in
Hugging Face's default format (one tensor per expert and matrix, float32). Each measurement runs in a
fresh process that first imports everything, notes its private resident memory (``RssAnon``: what the
process itself holds, not the checkpoint's file pages the kernel maps in and may drop), then loads while
a thread samples it every 2 ms, and reports the peak above that baseline:

- ``transformers``: ``AutoModelForCausalLM.from_pretrained`` alone (the reference: the weights once,
  plus what its loader holds while it fuses the experts);
- ``ubsmoe``: ``build_model`` (that load, then every sparse block turned into ubsmoe's MoE layer over
  views of the fused expert tensors, the LoRA factors and the language-model head).

``extra_over_disk`` is the peak above the baseline divided by the size on disk; ``ubsmoe_over_transformers``
compares the two peaks: near 1 means ubsmoe holds no second copy of the experts.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

MEASURE = r"""
import json, sys, threading, time
import torch

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

folder, which = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
from transformers import AutoModelForCausalLM
from ubsmoe.model import ModelSpec, build_model
from ubsmoe.tasks.causal_lm import language_model_head
base = status("RssAnon:")
peak = [base]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon:"))
        time.sleep(0.002)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
try:
    if which == "transformers":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=False)
    else:
        model = build_model(ModelSpec(backbone=folder, lora_rank=8), language_model_head(folder))
finally:
    done.set()
    sampler.join()
print(json.dumps({"baseline": base, "peak": max(peak[0], status("RssAnon:")), "after": status("RssAnon:"),
                  "file_pages_after": status("RssFile:")}))
"""


def write_checkpoint(folder: Path, layers: int, experts: int, hidden: int, expert_width: int, vocab: int) -> int:
    """A random OLMoE-shaped checkpoint with a word tokenizer; its size on disk in bytes."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i + 3 for i in range(vocab - 3)} | {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    config = transformers.OlmoeConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                      num_attention_heads=8, num_key_value_heads=8, intermediate_size=expert_width,
                                      num_experts=experts, num_experts_per_tok=min(8, experts), max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(folder: Path, which: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(folder), which], capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {which}'s loading failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(out: Path, layers: int = 4, experts: int = 64, hidden: int = 512, expert_width: int = 256,
        vocab: int = 1024) -> dict:
    with tempfile.TemporaryDirectory(prefix="ubsmoe-native-load-") as tmp:
        folder = Path(tmp)
        disk = write_checkpoint(folder, layers, experts, hidden, expert_width, vocab)
        runs = {which: measure(folder, which) for which in ("transformers", "ubsmoe")}
    extra = {which: r["peak"] - r["baseline"] for which, r in runs.items()}
    result = {
        "command": f"ubsmoe bench native-load --out {out}",
        "shape": {"layers": layers, "experts": experts, "hidden": hidden, "expert_width": expert_width,
                  "vocab": vocab, "dtype": "float32"},
        "disk_bytes": disk,
        "runs": runs,
        "peak_extra_bytes": extra,
        "extra_over_disk": {which: e / disk for which, e in extra.items()},
        "after_over_disk": {which: (r["after"] - r["baseline"]) / disk for which, r in runs.items()},
        "ubsmoe_over_transformers": extra["ubsmoe"] / extra["transformers"],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    mib = 2**20
    out.with_suffix(".md").write_text(
        f"# Loading a native MoE checkpoint: peak memory\n\nMade by `{result['command']}`: a random OLMoE-shaped "
        f"checkpoint ({layers} layers, {experts} experts of width {expert_width}, hidden {hidden}, float32), "
        f"{disk / mib:.0f} MiB on disk. Peak private resident memory (RssAnon, sampled every 2 ms) above the "
        "process's baseline after its imports:\n\n"
        "| loader | peak above baseline (MiB) | peak over the size on disk | held after loading, over the size on disk |\n"
        "|---|---|---|---|\n"
        + "".join(f"| {w} | {extra[w] / mib:.0f} | {result['extra_over_disk'][w]:.2f} | "
                  f"{result['after_over_disk'][w]:.2f} |\n" for w in extra)
        + f"\nubsmoe's peak is {result['ubsmoe_over_transformers']:.2f}x that of transformers' own loading: the "
          "experts are not copied. What rises above the size on disk during loading is transformers' loader "
          "(it stacks the per-expert tensors of this format into fused ones).\n")
    return result
