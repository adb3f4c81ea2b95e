"""What a hook sees of the experts' computation in a sparse-MoE layer (``MoEHook.observe_experts``), and the
gradient rows it may add to every expert's LoRA weight gradients."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ExtraRows:
    """Rows (T, E r) that a hook adds to every expert's LoRA weight gradients, shared by a layer's forward, the
    hook and the backward, when a hook reads every expert (``MoEHook.reads_every_expert``; otherwise the layer
    refuses rows): ``up`` and ``gate`` (set in a gradient hook of that projection's output, before the
    backward reaches it) join the rows whose product x^T rows is grad A_e; ``down`` (set in the forward)
    joins the rows whose product rows^T g is grad B_e of the down-projection. The down-projection's backward
    then leaves ``down_through_b``: s g(x) B_e^T for every token and expert."""

    up: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    down: torch.Tensor | None = None
    down_through_b: torch.Tensor | None = None

    def take(self, name: str) -> torch.Tensor | None:
        """The rows of ``name`` (up, gate or down), once: the backward that adds them consumes them."""
        rows = getattr(self, name)
        setattr(self, name, None)
        return rows


@dataclass
class ExpertComputation:
    """The experts' computation on the S slots of a layout (the token of slot s is ``layout.token[s]``)."""

    tokens: torch.Tensor  # (T, d) the layer's input
    up: torch.Tensor  # (S, h) the up-projection
    gate: torch.Tensor | None  # (S, h) the gate projection; None for ungated FFNs
    activation: torch.Tensor  # (S, h) after the activation
    hidden: torch.Tensor  # (S, h) the activation times the gate value: what the down-projection reads
    gates: torch.Tensor  # (S,) the gate values
    projected: dict[str, torch.Tensor]  # "up", "gate": (T, E, r) every token's x A_e for every expert, in
    # training when a hook reads every expert (``MoEHook.reads_every_expert``); empty otherwise
    extra_rows: ExtraRows  # shared with the layer's backward
