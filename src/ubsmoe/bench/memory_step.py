"""One UB-SMoE client step measured in its own process, for ``ubsmoe bench memory``:
``python -m ubsmoe.bench.memory_step FOLDER K BATCH LENGTH STEPS THREADS CHECKPOINTING`` prints one JSON line: the private
resident memory after building and at the first step's peak, the bytes autograd saved for the backward,
the gradients' and AdamW moments' bytes, the step's counted FLOPs and every step's seconds."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time

import torch
import torch.nn.functional as F

from ubsmoe.methods import get_method
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.model import ModelSpec, build_model
from ubsmoe.model.activation_checkpointing import set_attention_checkpointing
from ubsmoe.tasks.causal_lm import language_model_head


def anon() -> int:
    """This process's private resident memory (RssAnon), in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(folder: str, k: int, batch: int, length: int, steps: int, threads: int, checkpointing: bool = False) -> dict:
    """K of the model's 8 experts a token; ``steps`` AdamW steps on random tokens (causal-LM loss); with
    ``checkpointing``, the attention blocks recomputed in the backward."""
    torch.set_num_threads(threads)
    model = build_model(ModelSpec(backbone=folder, lora_rank=8), language_model_head(folder))
    method_cls = get_method("ubsmoe")
    method = method_cls(method_cls.Options(), k_max=8)
    method.prepare_model(model)
    settings = method.tier_settings(k / 8)
    assert settings.top_k == k, settings
    method.setup_client(model, settings)
    set_attention_checkpointing(model, checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.head.weight.shape[0]
    base = anon()
    peak = [base]
    done = threading.Event()
    parameters = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}  # not activations
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in parameters:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    counter = FlopCounter(model)
    flops = None

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
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if step == 0 else contextlib.nullcontext():
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
            flops = counter.count(mask, training=True).as_dict()
            counter.close()
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return ({"k": k, "after_build": base, "peak_first_step": peak[0], "extra": peak[0] - base,
                      "gradient_and_adam_bytes": 3 * trained, "saved_bytes": sum(saved.values()),
                      "train_flops": flops, "step_seconds": times})


if __name__ == "__main__":
    folder, k, batch, length, steps, threads, checkpointing = sys.argv[1], *map(int, sys.argv[2:8])
    print(json.dumps(main(folder, k, batch, length, steps, threads, bool(checkpointing))))
