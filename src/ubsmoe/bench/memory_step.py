"""One UB-SMoE client's local steps measured in their own process, for ``ubsmoe bench memory``. Prints one
JSON line: the private resident memory after building and at the first step's peak, the bytes autograd
saved for the backward, the gradients' and AdamW moments' bytes, the step's counted FLOPs and every step's
seconds.

``python -m ubsmoe.bench.memory_step native FOLDER K BATCH LENGTH STEPS THREADS CHECKPOINTING``: a native MoE
checkpoint, K of its 8 experts a token, random tokens.
``python -m ubsmoe.bench.memory_step experiment BUDGET BATCH STEPS THREADS CHECKPOINTING [key=value ...]``: the
model of an experiment config (an upcycled backbone with its default shared experts), a client of that budget,
the first BATCH training examples of the config's task.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ubsmoe.methods import get_method
from ubsmoe.methods.base import FederatedMethod
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.model import MoEModel, ModelSpec, build_model
from ubsmoe.model.activation_checkpointing import set_attention_checkpointing
from ubsmoe.tasks.causal_lm import language_model_head


def anon() -> int:
    """This process's private resident memory (RssAnon), in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def measure_steps(model: MoEModel, method: FederatedMethod, loss_of: Callable[[int], torch.Tensor],
                  mask_of: Callable[[int], torch.Tensor], steps: int, checkpointing: bool) -> dict:
    """``steps`` AdamW steps of a client already set up on ``model``: ``loss_of(step)`` is the task loss of
    step's batch, ``mask_of(step)`` its attention mask (B, S). Memory is sampled in the first step."""
    set_attention_checkpointing(model, checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
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

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.002)

    counter = FlopCounter(model)
    flops = None
    times = []
    for step in range(steps):
        if step == 0:
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if step == 0 else contextlib.nullcontext():
            loss = loss_of(step)
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
            flops = counter.count(mask_of(step), training=True).as_dict()
            counter.close()
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {"after_build": base, "peak_first_step": peak[0], "extra": peak[0] - base,
            "gradient_and_adam_bytes": 3 * trained, "saved_bytes": sum(saved.values()), "train_flops": flops,
            "step_seconds": times}


def native(folder: str, k: int, batch: int, length: int, steps: int, threads: int, checkpointing: bool = False) -> dict:
    """K of the model's 8 experts a token; causal-LM loss on random tokens."""
    torch.set_num_threads(threads)
    model = build_model(ModelSpec(backbone=folder, lora_rank=8), language_model_head(folder))
    method_cls = get_method("ubsmoe")
    method = method_cls(method_cls.Options(), k_max=8)
    method.prepare_model(model)
    settings = method.tier_settings(k / 8)
    assert settings.top_k == k, settings
    method.setup_client(model, settings)
    generator = torch.Generator().manual_seed(0)
    vocab = model.head.weight.shape[0]
    batches = [torch.randint(3, vocab, (batch, length), generator=generator) for _ in range(steps)]
    positions = torch.ones(batch, length, dtype=torch.bool)
    positions[:, -1] = False

    def loss_of(step: int) -> torch.Tensor:
        ids = batches[step]
        logits = model(ids, torch.ones_like(ids), positions=positions)
        return F.cross_entropy(logits, ids[:, 1:].reshape(-1))

    return {"k": k} | measure_steps(model, method, loss_of, lambda step: torch.ones_like(batches[step]), steps,
                                    checkpointing)


def experiment(budget: float, batch: int, steps: int, threads: int, checkpointing: bool,
               overrides: list[str]) -> dict:
    """A UB-SMoE client of ``budget`` on the experiment the overrides describe; its task's loss on the first
    ``batch`` training examples at every step (the peak does not depend on which examples, only on their
    padded length)."""
    from ubsmoe.config import load_config
    from ubsmoe.engine.experiment import build_experiment

    config = load_config(overrides=[f"threads={threads}", "data.max_test_samples=16", *overrides], method="ubsmoe")
    exp = build_experiment(config)
    model, method = exp.model, exp.method
    model.load_trainable_state(method.initial_state(model).params)
    settings = method.tier_settings(budget)
    method.setup_client(model, settings)
    data = exp.train.batch(torch.arange(batch))
    tokens = int(data[1].sum())
    result = measure_steps(model, method, lambda step: exp.task.loss(model, data), lambda step: data[1], steps,
                           checkpointing)
    shared = config.model.shared_experts  # K counts them: the tier runs them and top_k routed experts
    return {"budget": budget, "k": settings.top_k + shared, "shared_experts": shared,
            "batch_shape": list(data[1].shape), "tokens": tokens} | result


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "native":
        folder, k, batch, length, steps, threads, checkpointing = args[0], *map(int, args[1:7])
        print(json.dumps(native(folder, k, batch, length, steps, threads, bool(checkpointing))))
    elif mode == "experiment":
        budget, (batch, steps, threads, checkpointing), overrides = float(args[0]), map(int, args[1:5]), args[5:]
        print(json.dumps(experiment(budget, batch, steps, threads, bool(checkpointing), overrides)))
    else:
        raise SystemExit(f"unknown mode {mode!r}: native or experiment")
