"""Matmul FLOPs of a forward (and backward) pass, counted from the routing the batch actually took.

Counted, with a multiply-add as 2 FLOPs:
- every frozen ``nn.Linear`` inside the transformer blocks (attention projections), on all B x S
  positions (padding included: attention runs on it); its LoRA on the active rank;
- attention scores and the weighted sum of values, 2 x B x S^2 x (heads x head dim) each;
- each MoE layer on its routed (token, expert) slots only (padding is never routed): the frozen expert
  matrices, the router on the real tokens, and LoRA at the active rank as the layer computes it: every
  projection runs through its merged weight W + s A B (E d h r per matrix and batch), and in training
  the factor on the model-width side (A of up/gate, B of down) costs two products per slot, or, when a
  hook reads every expert (``MoEHook.reads_every_expert``: the pseudo-gradient), two dense (T, d) x
  (d, E r) products over every expert and real token, and the factor on the expert-width side two
  products per slot (at K = M, every expert's slots are every token); at inference on so few slots that
  the layer skips the merge (``SparseMoEFFN.merges``), s (x A_e) B_e per slot instead; in training of
  experts too large to merge, the LoRA apart: the model-width products per slot (or x A_e for every
  token and expert and its dense gradient, as above), and the expert-width products per slot;
- an upcycled shared part (``model.shared_experts``) as a one-expert MoE layer on every real token;
  Qwen2-MoE's always-on shared expert and its gate, under experts, on all B x S positions as it runs;
- the task's head, as the head counts itself (``TaskHead.flops``: classification, one product per
  pooled vector);
- in training, the backward pass: a frozen matrix needs the input gradient only (1 x its forward),
  and none where its input needs no gradient (the first block's projections read the frozen
  embeddings; seen in the forward, not assumed); a trainable one needs the input and the weight
  gradients (2 x); attention scores 2 x; plus what the layers' method hooks declare
  (``MoEHook.training_flops``: the Universal Pseudo-Gradient's factor products, 4 T E r h per matrix;
  the dense model-width products it makes the layer run are under the LoRA, above).
Not counted: embeddings, normalisation, activations, softmax, the optimiser (all linear in the
number of parameters or positions and small next to the matmuls), and the bias column, alignment
padding and, for gated experts' fused gate and up (``fused_gate_up``), the zero blocks beside each
projection's s B columns that ride in the fused expert matmuls (implementation overhead, a few columns
of d: 4 S h r per layer for the zero blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ubsmoe.model.lora import LoRALinear
from ubsmoe.model.shared_expert import SharedExpertMoE


@dataclass
class PassFlops:
    """FLOPs of one pass, split by where they go."""

    attention: float = 0.0  # projections (frozen part) and scores
    experts: float = 0.0  # frozen expert matrices (routed slots, and a shared expert's positions)
    lora: float = 0.0  # every LoRA (attention and experts)
    router: float = 0.0
    head: float = 0.0
    hooks: float = 0.0  # extra work of method hooks in training (the pseudo-gradient)

    @property
    def total(self) -> float:
        return self.attention + self.experts + self.lora + self.router + self.head + self.hooks

    def __add__(self, other: "PassFlops") -> "PassFlops":
        return PassFlops(*(getattr(self, f) + getattr(other, f) for f in self.__dataclass_fields__))

    def as_dict(self) -> dict[str, float]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__} | {"total": self.total}


class FlopCounter:
    """Counts a model's matmul FLOPs per batch; built once per model (it reads the architecture).

    It keeps forward pre-hooks on the model's linear layers; ``close`` (or leaving a ``with`` block)
    takes them off."""

    def __init__(self, model: nn.Module):
        self.model = model
        blocks = model.family.layers(model.backbone)
        # MoE layers are counted from their routing, LoRA-wrapped linears together with their LoRA
        skip = {id(m) for layer in list(model.moe_layers) + list(model.shared_layers) for m in layer.modules()}
        skip |= {id(m.base) for m in model.modules() if isinstance(m, LoRALinear)}
        shared = {id(m) for block in blocks for moe in block.modules() if isinstance(moe, SharedExpertMoE)
                  for m in moe.modules()}
        self.frozen_linears: list[nn.Linear] = []
        self.shared_expert_linears: list[nn.Linear] = []  # Qwen2-MoE's shared expert and its gate
        self.lora_modules: list[LoRALinear] = []
        for block in blocks:
            for module in block.modules():
                if id(module) in skip:
                    continue
                if isinstance(module, LoRALinear):
                    self.lora_modules.append(module)
                elif isinstance(module, nn.Linear):
                    (self.shared_expert_linears if id(module) in shared else self.frozen_linears).append(module)
        # Whether each linear's input needed a gradient in the last forward: the first block's
        # projections read the frozen embeddings, so their backward stops at the weights' own terms.
        self.input_needs_grad: dict[nn.Module, bool] = {}
        self._handles = [module.register_forward_pre_hook(self._note_input)
                         for module in self.frozen_linears + self.shared_expert_linears + self.lora_modules]
        config = model.backbone.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.attention_width = heads * head_dim
        self.num_blocks = len(blocks)

    def close(self) -> None:
        """Take the counter's hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "FlopCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _note_input(self, module: nn.Module, args: tuple) -> None:
        self.input_needs_grad[module] = bool(args and isinstance(args[0], torch.Tensor) and args[0].requires_grad)

    def count(self, attention_mask: torch.Tensor, training: bool) -> PassFlops:
        """FLOPs of the pass the model just ran on a batch with this mask (B, S); reads each MoE
        layer's last routing, so call it after the forward (and, in training, after the backward)."""
        batch, seq = attention_mask.shape
        positions = batch * seq
        tokens = int(attention_mask.sum())
        grad = 1 if training else 0  # backward multipliers: frozen 1x, trainable 2x
        flops = PassFlops()

        def frozen_linear(module: nn.Linear) -> float:  # on every position; its input gradient if it needs one
            input_grad = grad * self.input_needs_grad.get(module, True)
            return 2 * positions * module.in_features * module.out_features * (1 + input_grad)

        frozen = sum(map(frozen_linear, self.frozen_linears), 0.0)
        flops.experts += sum(map(frozen_linear, self.shared_expert_linears), 0.0)
        for module in self.lora_modules:
            base, rank = module.base, module.active_rank
            input_grad = grad * self.input_needs_grad.get(module, True)
            frozen += 2 * positions * base.in_features * base.out_features * (1 + input_grad)
            # x A and (x A) B, their weight gradients and the gradient of x A; if x needs a gradient, it
            # flows through the merged weight W + s (A B)ᵀ: one merge per batch, no product of its own
            flops.lora += 2 * positions * rank * ((base.in_features + base.out_features) * (1 + grad)
                                                  + base.out_features * grad)
            flops.lora += 2 * rank * base.in_features * base.out_features * input_grad
        scores = 2 * 2 * batch * seq * seq * self.attention_width * self.num_blocks
        flops.attention = frozen + scores * (1 + 2 * grad)
        for layer in list(self.model.moe_layers) + list(self.model.shared_layers):  # routed, then shared parts
            if layer.router is not None and layer.top_k == 0:  # the shared part runs alone: nothing routed
                continue
            slots = tokens * (layer.top_k if layer.router is not None else 1)
            matrices = len(layer.adapted)
            flops.experts += 2 * slots * layer.d_model * layer.d_hidden * matrices * (1 + grad)
            # the model-width factor's products run over every (token, expert) pair or over the slots
            every_expert = layer.router is not None and layer.top_k < layer.num_experts and layer.reads_every_expert()
            model_width = (tokens * layer.num_experts if every_expert else slots) * layer.d_model  # per rank and matrix
            if layer.merges(slots, training):
                lora_macs = model_width + slots * layer.d_hidden  # per rank and matrix
                merge = layer.num_experts * layer.d_model * layer.d_hidden  # W + s A B, once per batch
                flops.lora += 2 * (merge + 2 * grad * lora_macs) * layer.active_rank * matrices
            elif training:  # large experts: the LoRA apart (``UnmergedUpProjection``, ``UnmergedDownProjection``)
                # x A_e and the gradient of the model-width factor, plus per slot the expert-width products:
                # forward, their input gradient and their weight gradient, and the input gradient through A_e
                lora_macs = 2 * model_width + slots * (3 * layer.d_hidden + layer.d_model)
                flops.lora += 2 * lora_macs * layer.active_rank * matrices
            else:  # inference on few slots: s (x A_e) B_e per slot, no merged weight
                flops.lora += 2 * slots * (layer.d_model + layer.d_hidden) * layer.active_rank * matrices
            if layer.router is not None:
                flops.router += 2 * tokens * layer.d_model * layer.num_experts * (1 + 2 * grad)
            if training:
                flops.hooks += sum(hook.training_flops(layer, tokens) for hook in layer.hooks)
        flops.head = self.model.head.flops(attention_mask, training)
        return flops

