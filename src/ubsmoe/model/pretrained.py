"""Loading a pretrained Hugging Face backbone: its tokenizer, config, frozen weights and native MoE shape."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ubsmoe.model import fast_dropout, fast_norm
from ubsmoe.model.backbones import NATIVE_MOE_TYPES, BackboneFamily, family_of, resolve_backbone


def load_tokenizer(backbone: str):
    """The backbone's own tokenizer, with a padding token (decoders reuse end-of-sequence)."""
    from transformers import AutoTokenizer

    source = resolve_backbone(backbone)
    tokenizer = AutoTokenizer.from_pretrained(source.folder, **source.pretrained_kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def backbone_config(backbone: str):
    """The backbone's Hugging Face config, read without its weights (and without running any code)."""
    from transformers import AutoConfig

    source = resolve_backbone(backbone)
    return AutoConfig.from_pretrained(source.folder, **source.pretrained_kwargs())


def load_dense_backbone(backbone: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, BackboneFamily]:
    """The pretrained Hugging Face model (no task head, no pooler: the task's head reads the hidden
    states itself), frozen, with CPU-cheap dropout (``fast_dropout``) and RMSNorm (``fast_norm``), and
    its family."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    source = resolve_backbone(backbone)
    config = AutoConfig.from_pretrained(source.folder, **source.pretrained_kwargs())
    family = family_of(config.model_type)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModel.from_pretrained(source.folder, dtype=dtype, **source.pretrained_kwargs())
    finally:
        hf_logging.set_verbosity(verbosity)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's [CLS] dense + tanh: computed for nothing, the head reads our own pooling
    for p in model.parameters():
        p.requires_grad_(False)
    fast_dropout.install(model)
    fast_norm.install(model)
    return model, family


@dataclass(frozen=True)
class NativeShape:
    """A native MoE checkpoint's experts per layer (M) and the experts a token takes (K)."""

    num_experts: int
    top_k: int


def native_moe_shape(backbone: str) -> NativeShape | None:
    """M and K of a native MoE backbone, read from its config without its weights; None for a dense one."""
    config = backbone_config(backbone)
    if config.model_type not in NATIVE_MOE_TYPES:
        return None
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts")
    return NativeShape(int(experts), int(config.num_experts_per_tok))
