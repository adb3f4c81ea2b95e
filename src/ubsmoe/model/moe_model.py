"""The model every method trains: a pretrained backbone with sparse-MoE FFNs, attention LoRA and a task head."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ubsmoe.model.backbones import BackboneFamily, backbone_identity
from ubsmoe.model.lora import LoRALinear
from ubsmoe.model.moe_layer import RoutingContext, SparseMoEFFN
from ubsmoe.model.pretrained import load_dense_backbone, native_moe_shape
from ubsmoe.model.shared_expert import SharedExpertMoE, UpcycledSharedMoE
from ubsmoe.model.upcycle import ROUTER_INITS, SHARED, UPCYCLED, upcycled_parts
from ubsmoe.storage import read_tensors, write_tensors

log = logging.getLogger(__name__)


@dataclass
class ModelSpec:
    """What to build; the experiment config's ``model`` section maps onto this."""

    backbone: str = "minilm"
    num_experts: int = 8
    lora_rank: int = 8
    lora_alpha: float = 16.0
    router_init: str = "calibrated"
    gate_mode: str = "straight_through"  # see SparseMoEFFN: straight_through, softmax or softmax_renorm
    seed: int = 0
    dropout: float | None = None  # every backbone dropout layer's probability; None keeps the checkpoint's
    precision: str = "fp32"  # or "bf16": the frozen weights in bfloat16 (``cast_frozen``)
    shared_experts: int = 0  # S of the num_experts slots form an always-on shared part (``model.shared_expert``)


class TaskHead(nn.Module):
    """What a task puts on top of the backbone: ``forward(hidden (B, S, d), mask (B, S) bool, **inputs)``
    gives the task's outputs; ``flops`` counts its matmuls for the FLOP counter."""

    def flops(self, attention_mask: torch.Tensor, training: bool, **inputs) -> float:
        """Matmul FLOPs of the head on a batch with this mask (B, S); in training with the backward
        (weight and input gradients of what trains, input gradients only of what is frozen)."""
        raise NotImplementedError


HeadFactory = Callable[[nn.Module, BackboneFamily, torch.Generator], TaskHead]
"""Builds a task's head from the loaded backbone, its family and the model's generator."""


class MoEModel(nn.Module):
    """A backbone whose FFNs are ``SparseMoEFFN`` blocks, with a task's head.

    forward(input_ids (B, S), attention_mask (B, S), **head inputs) -> the head's output. The backbone part
    is the same for every task; the head comes from the task (``ubsmoe.tasks``): it reads the last hidden
    states and gives what the task scores (pooled class logits, next-token logits, ...). Only the adapters,
    the routers and the head's trainable tensors train; the federated engine exchanges exactly those
    (``trainable_state``), so one model object serves every simulated client in turn.
    """

    def __init__(self, backbone: nn.Module, family: BackboneFamily, moe_layers: list[SparseMoEFFN],
                 head: TaskHead, context: RoutingContext, shared_layers: list[SparseMoEFFN] = (),
                 shared_experts: int = 0):
        super().__init__()
        self.backbone = backbone
        self.family = family
        self.moe_layers = nn.ModuleList(moe_layers)  # the routed experts of every layer
        # upcycled shared parts (``model.shared_expert``): S expert slots per layer always on, one-expert layers
        self.shared_layers = nn.ModuleList(shared_layers)
        self.shared_experts = shared_experts
        self.context = context
        self.shared_buffers: list[str] = []
        self.head = head

    @property
    def num_experts(self) -> int:
        """The routed experts per layer (M - S with S shared experts)."""
        return self.moe_layers[0].num_experts

    def set_top_k(self, k: int) -> None:
        """Every MoE layer activates k routed experts per token from now on (beside the S shared ones)."""
        for layer in self.moe_layers:
            layer.set_top_k(k)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (its inputs are moved there)."""
        return self.backbone.get_input_embeddings().weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **head_inputs) -> torch.Tensor:
        device = self.device
        head_inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in head_inputs.items()}
        return self.head(self.hidden_states(input_ids, attention_mask), attention_mask.to(device).bool(), **head_inputs)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states (B, S, d); padding positions are not routed. No key-value cache is
        built (a decoder builds one by default): nothing reads it, and a recomputed attention block
        (``activation_checkpointing``) would append its keys and values to it a second time."""
        return self.run_backbone(input_ids, attention_mask, use_cache=False).last_hidden_state

    def run_backbone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **backbone_inputs):
        """The backbone's output on input_ids (B, q). With a key-value cache (decoders), ``attention_mask``
        (B, past + q) covers the cached tokens too; the MoE layers route the q new positions, those whose
        mask is set."""
        device = self.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        backbone_inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in backbone_inputs.items()}
        self.context.token_mask = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:].bool()
        try:
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **backbone_inputs)
        finally:
            self.context.token_mask = None

    # ------------------------------------------------------------------ federated state
    def share_buffer(self, module: nn.Module, name: str, value: torch.Tensor) -> str:
        """Register a tensor that is not trained by gradient but travels with the trainable state
        (a selection bias, default expert outputs): ``module.<name>``. Returns its full name."""
        module.register_buffer(name, value)
        full = next(f"{prefix}.{name}" if prefix else name for prefix, m in self.named_modules() if m is module)
        self.shared_buffers.append(full)
        return full

    def _state_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {n: p for n, p in self.named_parameters() if p.requires_grad}
        buffers = dict(self.named_buffers())
        return tensors | {n: buffers[n] for n in self.shared_buffers}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """A copy of every trainable tensor and shared buffer, by name, on the CPU (where records live)."""
        return {n: t.detach().to("cpu", copy=True) for n, t in self._state_tensors().items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Overwrite the trainable tensors (and shared buffers) named in ``state``; unknown names are an error."""
        tensors = self._state_tensors()
        with torch.no_grad():
            for name, value in state.items():
                if name not in tensors:
                    raise KeyError(f"{name!r} is not a trainable parameter of this model")
                tensors[name].copy_(value)

    def state_name(self, tensor: torch.Tensor) -> str:
        """The name a parameter of the model has in ``trainable_state`` (its first path: a module that is
        also registered under ``moe_layers`` keeps the backbone's path)."""
        for name, p in self.named_parameters():
            if p is tensor:
                return name
        raise KeyError("the tensor is not a parameter of this model")

    def expert_tensors(self) -> dict[str, int]:
        """Name -> layer index of every trainable tensor stacked by expert (leading dimension E)."""
        return {self.state_name(p): i for i, layer in enumerate(self.moe_layers)
                for n, p in layer.named_parameters() if n.startswith("lora_") and p.requires_grad}

    def attach_hooks(self, hooks: list) -> None:
        """Every MoE layer runs these hooks (after the ones it has) from now on."""
        for layer in self.moe_layers:
            layer.hooks.extend(hooks)

    def detach_hooks(self, hooks: list) -> None:
        for layer in self.moe_layers:
            layer.hooks = [h for h in layer.hooks if not any(h is other for other in hooks)]

    def reset_routing_counters(self) -> None:
        for layer in self.moe_layers:
            layer.counter.reset()

    def routing_counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(routed (L, E), tokens (L,), prob_sum (L, E)) accumulated since the last reset."""
        routed = torch.stack([layer.counter.routed for layer in self.moe_layers])
        tokens = torch.tensor([layer.counter.tokens for layer in self.moe_layers], dtype=torch.float64)
        prob_sum = torch.stack([layer.counter.prob_sum for layer in self.moe_layers])
        return routed, tokens, prob_sum

    def parameter_report(self) -> dict[str, int]:
        """Trainable parameter counts by kind, checked against what the layer shapes imply."""
        report = {"experts_lora_per_expert": self.moe_layers[0].lora_parameters_per_expert()}
        for layer in self.moe_layers:
            stacked = sum(p.numel() for n, p in layer.named_parameters() if n.startswith("lora_"))
            if stacked != report["experts_lora_per_expert"] * layer.num_experts:
                raise AssertionError(
                    f"expert LoRA holds {stacked} numbers, expected "
                    f"{report['experts_lora_per_expert']} x {layer.num_experts} experts"
                )
        kinds = {id(p): "experts_lora" for layer in self.moe_layers for n, p in layer.named_parameters()
                 if n.startswith("lora_")}
        kinds |= {id(p): "router" for layer in self.moe_layers for n, p in layer.named_parameters()
                  if not n.startswith("lora_")}  # router weights and routing adjustments (phi, rescaling)
        kinds |= {id(p): "shared_expert_lora" for layer in self.shared_layers for p in layer.parameters()}
        kinds |= {id(p): "head" for p in self.head.parameters()}
        for p in self.parameters():
            if p.requires_grad:
                kind = kinds.get(id(p), "attention_lora")
                report[kind] = report.get(kind, 0) + p.numel()
        report["total_trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        report["total"] = sum(p.numel() for p in self.parameters())
        return report


@torch.no_grad()
def capture_ffn_inputs(model: nn.Module, family: BackboneFamily, batches) -> list[torch.Tensor]:
    """Run the dense model on ``batches`` of (input_ids, attention_mask) and return, per layer, the
    FFN inputs of the real tokens: a list of (n, d) tensors."""
    layers = family.layers(model)
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    current_mask: list[torch.Tensor] = []
    handles = []
    for i, layer in enumerate(layers):
        module = layer.intermediate if family.name == "bert" else layer.mlp
        handles.append(module.register_forward_hook(
            lambda _m, args, _out, i=i: captured[i].append(args[0][current_mask[0]])
        ))
    try:
        model.eval()
        for input_ids, attention_mask in batches:
            current_mask[:] = [attention_mask.bool()]
            model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(chunks) for chunks in captured]


def build_model(spec: ModelSpec, head: HeadFactory, calibration_batches=None, cache: Path | None = None) -> MoEModel:
    """Load the backbone, upcycle every FFN into ``spec.num_experts`` experts (a native MoE backbone keeps its
own: ``_build_native``), add LoRA and the task's head.

    calibration_batches: iterable of (input_ids, attention_mask), needed for ``router_init="calibrated"``.
    cache: a safetensors file for the upcycled experts and routers (the costly part: the neurons'
    clustering and the routers' calibration): read if it exists, else written. Its name must identify
    the spec, the backbone and the calibration data (``upcycle_cache_key``).
    """
    if spec.router_init not in ROUTER_INITS:
        raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {spec.router_init!r}")
    if spec.num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {spec.num_experts}")
    if spec.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {spec.precision!r}")
    generator = torch.Generator().manual_seed(spec.seed)
    # A native MoE loads straight in its precision (no float32 copy of its weights); a dense backbone is
    # upcycled in float32 and cast afterwards.
    native = native_moe_shape(spec.backbone) is not None
    model, family = load_dense_backbone(spec.backbone, PRECISIONS[spec.precision] if native else torch.float32)
    if spec.dropout is not None:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = spec.dropout
    if family.native_moe:
        return cast_frozen(_build_native(model, family, spec, head, RoutingContext(), generator), spec.precision)
    layers = family.layers(model)
    cached = None
    if cache is not None and cache.is_file():
        cached, _ = read_tensors(cache, f"delete {cache.name} (the experts are split and calibrated again) or run the "
                                        "experiment again with --force")
    shared = spec.shared_experts if spec.num_experts > 1 else 0
    if shared and not 0 < shared <= spec.num_experts - 2:
        raise ValueError(f"shared_experts must lie in [0, num_experts - 2 = {spec.num_experts - 2}] (at least two "
                         f"routed experts), got {shared}")
    calibration = None
    if cached is None and spec.num_experts > 1 and (spec.router_init == "calibrated" or shared):
        if calibration_batches is None:
            raise ValueError("router_init='calibrated' and shared experts need calibration batches; pass some")
        calibration = capture_ffn_inputs(model, family, calibration_batches)

    context = RoutingContext()
    moe_layers, shared_layers = [], []
    upcycled: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        dense = family.extract_ffn(layer)
        if cached is not None:
            parts = {name: cached[f"{i}.{name}"] for name in UPCYCLED + SHARED if f"{i}.{name}" in cached}
        else:
            parts = upcycled_parts(dense, spec.num_experts, shared, None if calibration is None else calibration[i],
                                   spec.router_init, seed=spec.seed + i)
            upcycled |= {f"{i}.{name}": value for name, value in parts.items()}
        moe = SparseMoEFFN(
            parts["w_up"], parts["w_down"], dense.activation, w_gate=parts.get("w_gate"), b_up=parts.get("b_up"),
            b_down=parts.get("b_down"), router_weight=parts.get("router"), lora_rank=spec.lora_rank,
            lora_alpha=spec.lora_alpha, gate_mode=spec.gate_mode, context=context, generator=generator,
        )
        if shared:
            part = SparseMoEFFN(
                parts["shared.w_up"], parts["shared.w_down"], dense.activation, w_gate=parts.get("shared.w_gate"),
                b_up=parts.get("shared.b_up"), b_down=parts.get("shared.b_down"), lora_rank=spec.lora_rank,
                lora_alpha=spec.lora_alpha, context=context, generator=generator,
            )
            family.install_ffn(layer, UpcycledSharedMoE(moe, part))
            shared_layers.append(part)
        else:
            family.install_ffn(layer, moe)
        for _, (parent, attr) in family.attention(layer).items():
            setattr(parent, attr, LoRALinear(getattr(parent, attr), spec.lora_rank, spec.lora_alpha, generator))
        moe_layers.append(moe)
    built = MoEModel(model, family, moe_layers, head(model, family, generator), context, shared_layers, shared)
    if cache is not None and cached is None:
        write_tensors(cache, upcycled, single_writer=False)  # whole or absent, also with several processes at once
    log.info("trainable parameters: %s", built.parameter_report())
    return cast_frozen(built, spec.precision)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cast_frozen(model: MoEModel, precision: str) -> MoEModel:
    """Every frozen floating-point parameter of the pretrained model, and the head's frozen buffers (an untied
    language-model head's weight), in the precision's dtype; what trains stays float32 (the LoRA factors, the
    routers, and what a method attaches after the build). The backbone's buffers, such as rotary
    frequencies, keep their dtype."""
    dtype = PRECISIONS[precision]
    if dtype == torch.float32:
        return model
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
        for name, buffer in list(model.head.named_buffers(recurse=False)):  # a frozen head matrix (an LM head)
            if buffer.is_floating_point():
                setattr(model.head, name, buffer.to(dtype))
    return model


def _build_native(model: nn.Module, family: BackboneFamily, spec: ModelSpec, head: HeadFactory,
                  context: RoutingContext, generator: torch.Generator) -> MoEModel:
    """A native MoE backbone: every sparse block becomes a ``SparseMoEFFN`` over the block's own expert
    tensors (views, not copies), with its router and its gate rule (softmax over all experts, top-k,
    renormalised when the checkpoint says so), and routes its pretrained top-k until a method sets K.
    Qwen2-MoE's shared expert and its sigmoid gate stay as they are, frozen, beside the routed experts."""
    moe_layers = []
    for layer in family.layers(model):
        native = family.extract_moe(layer)
        moe = SparseMoEFFN(
            native.w_up, native.w_down, native.activation, w_gate=native.w_gate, router_weight=native.router,
            lora_rank=spec.lora_rank, lora_alpha=spec.lora_alpha,
            gate_mode="softmax_renorm" if native.renormalise else "softmax", context=context, generator=generator,
        )
        moe.set_top_k(native.top_k)
        family.install_ffn(layer, moe if native.shared is None else SharedExpertMoE(moe, native.shared, native.shared_gate))
        for _, (parent, attr) in family.attention(layer).items():
            setattr(parent, attr, LoRALinear(getattr(parent, attr), spec.lora_rank, spec.lora_alpha, generator))
        moe_layers.append(moe)
    built = MoEModel(model, family, moe_layers, head(model, family, generator), context)
    log.info("trainable parameters: %s", built.parameter_report())
    return built


def upcycle_cache_key(spec: ModelSpec, calibration_batches) -> str:
    """A digest of everything the upcycled experts and routers depend on: the spec, the backbone's files
    (names, sizes, modification times) and the calibration batches' tokens."""
    digest = hashlib.sha256(repr(sorted(vars(spec).items())).encode())
    digest.update(json.dumps(backbone_identity(spec.backbone), sort_keys=True).encode())
    for input_ids, attention_mask in calibration_batches or []:
        digest.update(input_ids.numpy().tobytes())
        digest.update(attention_mask.numpy().tobytes())
    return digest.hexdigest()[:32]
