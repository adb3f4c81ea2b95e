"""Exporting a saved model per tier: a PEFT LoRA adapter for dense models, an ``ubsmoe predict`` folder for sparse ones.

Dense-model methods (``FederatedMethod.dense``: one expert per FFN) change the
backbone only by low-rank updates of its linear layers, so each tier's model is the original backbone
plus one LoRA adapter per adapted layer, which ``peft.PeftModel.from_pretrained`` loads:

- ``adapter_config.json``: LoRA with ``r`` = ``lora_alpha`` (scale 1: our ``alpha / r_max`` scale is
  folded into ``lora_B``), the adapted modules by name, ``base_model_name_or_path`` the backbone;
- ``adapter_model.safetensors``: ``lora_A.weight (r, in)`` and ``lora_B.weight (out, r)`` per module,
  keys as PEFT names them for ``AutoModelForCausalLM`` (causal-lm) or ``AutoModel`` (classification).

A tier's update of one layer is its adapter at the tier's rank, ``s * a[:, :r_c] b[:r_c]``; for the merging
methods (FLoRA, FLoRIST) also the rounds merged into the frozen weight, found as the difference from the
original weight and factored exactly by SVD (the singular values above ``1e-6`` of the largest and above the
weights' float32 rounding are kept).
The factors of every module are zero-padded to one rank, which changes nothing. A classification head
(pooling and a linear layer, trained with the adapters) is not part of the backbone: it is written beside
the adapter as ``task_head.safetensors`` (its pooling and labels in the metadata).

Sparse methods' tiers are not the dense backbone plus adapters: every FFN is split into experts with a
trained router choosing K_c of them per token (and, for some methods, biases or scales), which no PEFT
adapter type expresses. Their tier folder is a saved model restricted to that tier, which
``ubsmoe predict --run FOLDER`` and ``ubsmoe evaluate --run FOLDER`` load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ubsmoe.config import ConfigError
from ubsmoe.engine.saved_model import STATE, LoadedModel, SavedModel, write_saved
from ubsmoe.storage import check_writable_folder, fsync_folder, write_atomically
from ubsmoe.model import MoEModel
from ubsmoe.model.lora import LoRALinear

ADAPTER_CONFIG, ADAPTER_WEIGHTS, HEAD_WEIGHTS = "adapter_config.json", "adapter_model.safetensors", "task_head.safetensors"
SINGULAR_CUTOFF = 1e-6  # relative: singular values of a merged update below this times the largest are rounding


@dataclass
class LayerUpdate:
    """One adapted linear layer of the backbone: its module path (as in the Hugging Face model), its
    current low-rank adapter (a (in, r), b (r, out), scale s: update s a b in (in, out) layout), its frozen
    weight now and as the backbone had it (both (in, out)), which differ by what was merged."""

    module: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float
    weight: torch.Tensor
    original: torch.Tensor

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's (lora_A (r, in), lora_B (out, r)) with B A = the whole update (transposed to (out, in))."""
        a_parts, b_parts = [self.a.T.float()], [self.scale * self.b.T.float()]
        merged = (self.weight.double() - self.original.double())
        if merged.abs().max() > 0:
            u, s, vh = torch.linalg.svd(merged, full_matrices=False)  # merged (in, out) = U S Vh
            # the weights' own rounding: float32 steps of the weight's size over a random (in x out) matrix
            noise = torch.finfo(self.weight.dtype).eps * self.original.abs().max().item() * sum(map(math.sqrt, merged.shape))
            keep = int((s > max(s[0].item() * SINGULAR_CUTOFF, noise)).sum())
            a_parts.append(u[:, :keep].T.float())  # (keep, in)
            b_parts.append((vh[:keep].T * s[:keep]).float())  # (out, keep)
        return torch.cat(a_parts, 0), torch.cat(b_parts, 1)


def _adapted_layers(model: MoEModel):
    """(module path, frozen weight (in, out) view, a (in, r), b (r, out), scale) of every adapted linear layer
    of a dense model, at its active rank."""
    for path, module in model.backbone.named_modules():
        if isinstance(module, LoRALinear):
            r = module.active_rank
            yield path, module.base.weight.detach().T, module.lora_a[:, :r], module.lora_b[:r], module.scale
    family = model.family
    for index, layer in enumerate(model.moe_layers):
        for matrix in layer.adapted:
            r = layer.active_rank
            yield (f"{family.layer_path}.{index}.{family.ffn_modules[matrix]}", getattr(layer, f"w_{matrix}")[0].detach(),
                   getattr(layer, f"lora_{matrix}_a")[0, :, :r], getattr(layer, f"lora_{matrix}_b")[0, :r], layer.lora_scale)


def layer_updates(model: MoEModel, original: dict[str, torch.Tensor]) -> list[LayerUpdate]:
    """Every adapted linear layer of a dense model, as configured now (its active rank); ``original``:
    ``frozen_weights(model)`` before any merge."""
    return [LayerUpdate(path, a.detach(), b.detach(), scale, weight, original[path])
            for path, weight, a, b, scale in _adapted_layers(model)]


def frozen_weights(model: MoEModel) -> dict[str, torch.Tensor]:
    """A copy of the frozen weight (in, out) of every adapted layer, by module path (see ``layer_updates``)."""
    return {path: weight.clone() for path, weight, *_ in _adapted_layers(model)}


def tier_folder(out: Path, budget: float) -> Path:
    return out / f"tier-{budget:g}"


def check_export(saved: SavedModel, out: Path, tiers: list[float], force: bool) -> None:
    """Before the model loads: the tiers exist, ``out`` is a writable folder that is not the saved model's,
    and no tier folder to be written exists unless ``force`` (``ConfigError`` naming the fix)."""
    for budget in tiers:
        saved.check_tier(budget)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the exported tiers")
    source = saved.folder.resolve()
    for budget in tiers:
        target = tier_folder(out, budget).resolve()
        if target == source or source in target.parents or target in source.parents:
            raise ConfigError(f"--out {out} would write {tier_folder(out, budget)} over or inside the model it exports "
                              f"({saved.folder}): export into another folder")
    existing = [tier_folder(out, b) for b in tiers if tier_folder(out, b).exists()]
    if existing and not force:
        raise ConfigError(f"--out {out} already holds {', '.join(f.name for f in existing)}: choose another --out, "
                          "or pass --force to replace those tier folders")
    check_writable_folder("--out", out)


def export_tiers(loaded: LoadedModel, out: Path, tiers: list[float] | None = None) -> list[Path]:
    """One folder per tier in ``out`` (``tier-<budget>``): a PEFT adapter for a dense model, a saved
    model of that tier for a sparse one. Each is written into a temporary folder and then put in place,
    replacing a folder of that name (``check_export`` refuses one unless ``--force``). Returns the folders."""
    tiers = loaded.tiers if tiers is None else tiers
    for budget in tiers:
        loaded.check_tier(budget)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the exported tiers")
    dense = loaded.experiment.model.num_experts == 1
    original = frozen_weights(loaded.experiment.model) if dense else {}
    folders = []
    for budget in tiers:
        folder = tier_folder(out, budget)
        partial = out / f".{folder.name}.{os.getpid()}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        if dense:
            loaded.setup_tier(budget)
            write_peft_adapter(loaded, partial, original)
        else:
            write_tier_model(loaded, partial, budget)
        replace_folder(partial, folder)
        folders.append(folder)
    return folders


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target``: an earlier ``target`` is moved aside first and removed
    last, so that ``target`` is at every moment either the old folder or the new one (or briefly absent)."""
    old = target.with_name(f".{target.name}.{os.getpid()}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
    fsync_folder(target.parent)


def write_peft_adapter(loaded: LoadedModel, folder: Path, original: dict[str, torch.Tensor]) -> None:
    """The configured tier's backbone update as a PEFT LoRA adapter in ``folder`` (and a classification
    head beside it)."""
    model, config = loaded.experiment.model, loaded.experiment.config
    updates = layer_updates(model, original)
    factors = {u.module: u.factors() for u in updates}
    rank = max(a.shape[0] for a, _ in factors.values())
    task = loaded.experiment.task
    prefix = "base_model.model." + task.peft_module_prefix
    tensors = {}
    for module, (a, b) in factors.items():
        tensors[f"{prefix}{module}.lora_A.weight"] = _padded(a, (rank, a.shape[1])).cpu()
        tensors[f"{prefix}{module}.lora_B.weight"] = _padded(b, (b.shape[0], rank)).cpu()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS))
    adapter_config = {
        "peft_type": "LORA", "task_type": task.peft_task_type,
        "base_model_name_or_path": config.model.backbone, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": sorted(factors), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    write_atomically(folder / ADAPTER_CONFIG, json.dumps(adapter_config, indent=1))
    head = {n[len("head."):]: t for n, t in model.trainable_state().items() if n.startswith("head.")}
    if head:
        pooling = getattr(model.head, "pooling", "")
        save_file({n: t.contiguous() for n, t in head.items()}, str(folder / HEAD_WEIGHTS),
                  metadata={"pooling": pooling, "labels": json.dumps(loaded.card["label_names"])})


def write_tier_model(loaded: LoadedModel, folder: Path, budget: float) -> None:
    """The saved model with only tier ``budget``: a folder ``ubsmoe predict --run`` loads."""
    for path in loaded.folder.iterdir():
        if path.suffix == ".safetensors" and path.name != STATE:  # the upcycled experts and routers
            shutil.copy2(path, folder / path.name)
    write_saved(folder, loaded.state, dict(loaded.card, tiers={str(budget): loaded.card["tiers"][str(budget)]}))


def _padded(tensor: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    full = tensor.new_zeros(shape)
    full[: tensor.shape[0], : tensor.shape[1]] = tensor
    return full.contiguous()
