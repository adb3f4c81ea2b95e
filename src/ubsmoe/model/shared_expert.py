"""Always-on shared experts beside routed ones: the upcycled kind (``model.shared_experts``) and Qwen2-MoE's.

Upcycled (``UpcycledSharedMoE``): S of the M expert slots of a dense FFN form one always-active part,
the S h / M neurons that matter most on calibration tokens, with its own LoRA; the other neurons are
split into M - S routed experts. A client of budget beta runs K_c = max(1, floor(K_max beta)) experts,
S of them the shared part, so its FFN compute is that of K_c experts whatever S is, and K_c = M is
the dense FFN exactly. The shared part is a one-expert ``SparseMoEFFN`` outside ``MoEModel.moe_layers``:
routing, its statistics and every routing mechanism (DMR, the pseudo-gradient, balancing losses and
biases, default outputs, rescaling) see the routed experts only, and the shared part trains on its
true gradient, its LoRA averaged like the attention's.

Qwen2-MoE (``SharedExpertMoE``) brings its own shared expert, scaled by a sigmoid gate of the token: it
stays frozen as the checkpoint has it (no LoRA) and does not count in K, which is the checkpoint's
number of routed experts per token, as the model was pretrained.
"""

from __future__ import annotations

import torch
from torch import nn

from ubsmoe.model.moe_layer import SparseMoEFFN


class UpcycledSharedMoE(nn.Module):
    """An upcycled FFN with a shared part: hidden (B, S, d) -> routed(hidden) + shared(hidden), where
    ``shared`` is a one-expert ``SparseMoEFFN`` of width S h / M (it adds ``b_down``) and ``routed`` the
    M - S routed experts (top-(K_c - S) per token; 0 runs the shared part alone)."""

    def __init__(self, routed: SparseMoEFFN, shared: SparseMoEFFN):
        super().__init__()
        if shared.num_experts != 1 or routed.b_down is not None:
            raise ValueError("the shared part is one expert and adds b_down; the routed experts add none")
        self.routed, self.shared = routed, shared
        routed.beside_shared = True

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.routed(hidden) + self.shared(hidden)


class SharedExpertMoE(nn.Module):
    """Routed experts plus an always-on shared expert scaled by a sigmoid gate (Qwen2-MoE):
    hidden (B, S, d) -> routed(hidden) + sigmoid(shared_gate(hidden)) * shared(hidden)."""

    def __init__(self, routed: SparseMoEFFN, shared: nn.Module, shared_gate: nn.Module):
        super().__init__()
        self.routed, self.shared, self.shared_gate = routed, shared, shared_gate

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.routed(hidden) + torch.sigmoid(self.shared_gate(hidden)) * self.shared(hidden)
