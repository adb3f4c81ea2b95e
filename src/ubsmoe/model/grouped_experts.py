"""Stacked FFN experts with per-expert LoRA, computed on their tokens as grouped or batched matmuls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ubsmoe.model.expert_observation import ExpertComputation, ExtraRows
from ubsmoe.model.fused_gate_up import GroupedGateUpProjection
from ubsmoe.model.grouped_lora import (DenseDownProjection, DenseUpProjection, GroupedDownProjection,
                                       GroupedUpProjection, grouped_mm)
from ubsmoe.model.unmerged_lora import UnmergedDownProjection, UnmergedUpProjection, frozen_product
from ubsmoe.model.lora import kaiming_uniform

# Largest E d h (numbers per stacked expert matrix) that training merges into W + s A B: 16 M numbers, 64 MB in
# float32 per matrix (MiniLM's and SmolLM2's upcycled layers are below 1 M; OLMoE's 134 M are above).
MERGE_LIMIT = 2**24


@dataclass
class SlotLayout:
    """The S = T*K (token, expert) pairs of a batch, sorted by expert ("slots").

    order: (S,) position of each slot in the flattened (T, K) selection; token: (S,) its token;
    expert: (S,) its expert; pair: (S,) token * E + expert, its row in a flattened (T, E) table;
    counts: (E,) slots per expert (a Python list); ends: (E,) int32 cumulative counts, the group ends
    a grouped matmul takes.
    """

    order: torch.Tensor
    token: torch.Tensor
    expert: torch.Tensor
    counts: list[int]
    ends: torch.Tensor

    @property
    def pair(self) -> torch.Tensor:
        return self.token * len(self.counts) + self.expert

    @classmethod
    def from_experts(cls, experts: torch.Tensor, num_experts: int) -> "SlotLayout":
        """experts: (T, K) selected experts -> the layout sorted by expert (one stable sort)."""
        flat = experts.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        return cls(order, order // experts.shape[1], flat.index_select(0, order), counts.tolist(),
                   counts.cumsum(0).to(torch.int32))


ExpertObserver = Callable[[SlotLayout, ExpertComputation], None]
"""Sees the experts' computation on the slots of a layout (what ``MoEHook.observe_experts`` documents)."""


class GroupedExperts(nn.Module):
    """E FFN experts stacked into tensors, each with its own LoRA, run together on the tokens chosen for them.

    Frozen expert weights are stacked: ``w_up: (E, d, h)``, optional ``w_gate: (E, d, h)`` for gated
    (SwiGLU) FFNs, optional ``b_up: (E, h)``, ``w_down: (E, h, d)``, optional shared ``b_down: (d,)``.
    ``add_lora``, called once after construction (a subclass first registers its own parameters), gives every
    stacked matrix ``W`` (``adapted``) stacked LoRA factors ``lora_<name>_a: (E, in, r)`` and
    ``lora_<name>_b: (E, r, out)``, of which the first ``active_rank`` ranks are used.

    ``expert_outputs(x (T, d), experts (T, K), gates (T, K)) -> (T, d)``: every expert on every token
    (K = E, or no selection) as one wide FFN, or else the S = T*K slots grouped by expert; either through
    merged weights W + s A B or with the LoRA apart (``merges``). No token is dropped.
    """

    def __init__(
        self,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        activation: Callable[[torch.Tensor], torch.Tensor],
        *,
        w_gate: torch.Tensor | None = None,
        b_up: torch.Tensor | None = None,
        b_down: torch.Tensor | None = None,
        gate_mode: str = "straight_through",
        merge_limit: int = MERGE_LIMIT,
    ):
        super().__init__()
        num_experts, d_model, d_hidden = w_up.shape
        if w_down.shape != (num_experts, d_hidden, d_model):
            raise ValueError(f"w_down must be {(num_experts, d_hidden, d_model)}, got {tuple(w_down.shape)}")
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation = activation
        self.gate_mode = gate_mode  # how gates multiply: straight-through gates are exactly 1 (``router.GATE_MODES``)
        self.merge_limit = merge_limit
        # Training keeps the merged weights W + s A B for the backward, or forms them again there (a low-memory
        # client, ``activation_checkpointing``): the same numbers either way
        self.keep_merged = True
        # The frozen tensors are taken as they are, views included (a native MoE's transposed experts): no copy
        frozen = lambda t: None if t is None else nn.Parameter(t.detach(), requires_grad=False)  # noqa: E731
        self.w_up, self.w_gate, self.w_down = frozen(w_up), frozen(w_gate), frozen(w_down)
        self.b_up, self.b_down = frozen(b_up), frozen(b_down)
        self.adapted = ["up", "down"] + (["gate"] if w_gate is not None else [])

    def add_lora(self, rank: int, alpha: float, generator: torch.Generator | None) -> None:
        """Register the LoRA factors of every adapted matrix: A Kaiming-uniform, B zero (the experts unchanged)."""
        self.lora_rank = rank
        self.lora_scale = alpha / rank
        self.active_rank = rank
        for name in self.adapted:
            d_in, d_out = (self.d_hidden, self.d_model) if name == "down" else (self.d_model, self.d_hidden)
            a = kaiming_uniform((self.num_experts, d_in, rank), d_in, generator)
            self.register_parameter(f"lora_{name}_a", nn.Parameter(a))
            self.register_parameter(f"lora_{name}_b", nn.Parameter(torch.zeros(self.num_experts, rank, d_out)))

    def lora_parameters_per_expert(self) -> int:
        """Trainable LoRA numbers of one expert: r * (in + out) for every adapted matrix."""
        return len(self.adapted) * self.lora_rank * (self.d_hidden + self.d_model)

    def frozen(self, name: str) -> torch.Tensor | None:
        """Frozen tensor ``w_up``, ``w_gate``, ``w_down``, ``b_up`` or ``b_down`` in the dtype the layer computes
        in (its LoRA factors'): a bf16 model's experts are upcast for the call, so that W + s A B is formed in
        float32 and no update is folded into bf16 weights."""
        tensor = getattr(self, name)
        compute = self.lora_up_a.dtype
        return tensor if tensor is None or tensor.dtype == compute else tensor.to(compute)

    def merges(self, slots: int, grad: bool) -> bool:
        """Whether ``slots`` (token, expert) pairs run through merged weights W + s A B. When gradients flow,
        whenever every expert's merged matrix is small (E d h <= ``merge_limit``: the backward reuses it,
        and it is the fastest path on small models); larger experts keep the LoRA apart, so that memory
        beyond the frozen weights grows with K. Without gradients only when merging (E d h r multiply-adds
        per matrix) costs less than the LoRA products of the slots themselves (S r (d + h)): a decoding
        step's few tokens take the unmerged path. The FLOP counter follows the same rule."""
        size = self.num_experts * self.d_model * self.d_hidden
        if grad:
            return size <= self.merge_limit
        return slots * (self.d_model + self.d_hidden) >= size

    def _merge_pays(self, slots: int) -> bool:
        return self.merges(slots, torch.is_grad_enabled())

    def expert_outputs(self, x: torch.Tensor, experts: torch.Tensor | None = None, gates: torch.Tensor | None = None,
                       observe: ExpertObserver | None = None, every_expert: bool = False) -> torch.Tensor:
        """x: (T, d) tokens; experts, gates: (T, K) each token's experts and their gates, or None for every
        expert ungated (a one-expert FFN) -> (T, d) the gated sum of the experts' outputs, without ``b_down``.
        ``observe`` sees the computation on the slots when K < E; ``every_expert``: training forms x A_e for
        every token and expert and takes the model-width LoRA gradients over every (token, expert) pair,
        for a hook that reads them (``MoEHook.reads_every_expert``), rather than over the slots alone."""
        if experts is None:
            return self._all_experts(x, None)
        if experts.shape[1] == self.num_experts:
            # Every expert takes every token: no sort or gather, the dense FFN's compute exactly.
            by_expert = torch.empty_like(gates).scatter(1, experts, gates)  # (T, E) in expert order
            return self._all_experts(x, by_expert)
        layout = SlotLayout.from_experts(experts, self.num_experts)
        slot_gates = gates.reshape(-1).index_select(0, layout.order)
        if self._merge_pays(layout.token.shape[0]):
            return self._routed_experts(x, layout, slot_gates, merged=True, observe=observe, every_expert=every_expert)
        if torch.is_grad_enabled():
            return self._routed_experts(x, layout, slot_gates, merged=False, observe=observe, every_expert=every_expert)
        return self._routed_experts_unmerged(x, layout, slot_gates, observe)

    def _lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The active ranks of matrix ``name``'s stacked LoRA: a (E, in, r), b (E, r, out). Detached when no
        gradient is taken (evaluation), so that the projections leave out what only the LoRA gradients need:
        the A columns of the down-projection's matmul, x A_e for every expert, the tensors kept for a backward."""
        a, b = getattr(self, f"lora_{name}_a"), getattr(self, f"lora_{name}_b")
        if not torch.is_grad_enabled():
            a, b = a.detach(), b.detach()
        if self.active_rank == self.lora_rank:
            return a, b
        return a[:, :, : self.active_rank].contiguous(), b[:, : self.active_rank].contiguous()

    def _hidden(self, up: torch.Tensor, gate: torch.Tensor | None, b_up: torch.Tensor | None) -> torch.Tensor:
        """The activation: act(up + b_up) or, for gated FFNs, act(gate) * up."""
        if b_up is not None:
            up = up + b_up
        return self.activation(gate) * up if gate is not None else self.activation(up)

    def _apply_gates(self, hidden: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """hidden (..., h) times gates (...); straight-through gates are exactly 1, so no multiply."""
        if self.gate_mode == "straight_through":
            return _UnitGate.apply(hidden, gates)
        return hidden * gates.unsqueeze(-1)

    def _routed_experts(self, x: torch.Tensor, layout: SlotLayout, slot_gates: torch.Tensor, merged: bool = True,
                        observe: ExpertObserver | None = None, every_expert: bool = False) -> torch.Tensor:
        """Experts on their slots, grouped by expert. x: (T, d); slot_gates: (S,) -> (T, d).

        Each projection runs through its merged weight W + s A B (``grouped_lora``; a gated FFN's gate and up
        as one grouped matmul, ``fused_gate_up``), or, for experts too large to merge them all
        (``merged=False``), through the frozen weight with the LoRA apart, so that memory grows with K; the
        gate multiplies the hidden activation (S, h/E) rather than the output (S, d): the
        same value over fewer numbers.
        """
        T = x.shape[0]
        extra_rows = ExtraRows()  # what hooks add to the LoRA weight gradients, and read back
        projections = {}
        up_projection = GroupedUpProjection if merged else UnmergedUpProjection
        down_projection = GroupedDownProjection if merged else UnmergedDownProjection
        weight = self.frozen if merged else (lambda name: getattr(self, name))  # unmerged: w in its own dtype
        merged_args = (self.keep_merged,) if merged else ()

        def project(name: str, bias: torch.Tensor | None = None) -> torch.Tensor:  # (S, h)
            a, b = self._lora_factors(name)
            out, projected = up_projection.apply(x, a, weight(f"w_{name}"), b, bias, self.lora_scale,
                                                 layout.token, layout.pair, layout.ends, layout.counts, name,
                                                 extra_rows, *merged_args, every_expert)
            if every_expert:
                projections[name] = projected.view(T, self.num_experts, projected.shape[1] // self.num_experts)
            return out

        if merged and self.w_gate is not None:  # gate and up as one grouped matmul (``fused_gate_up``)
            (a_gate, b_gate), (a_up, b_up) = self._lora_factors("gate"), self._lora_factors("up")
            both, *projected = GroupedGateUpProjection.apply(
                x, a_gate, a_up, self.frozen("w_gate"), self.frozen("w_up"), b_gate, b_up, self.frozen("b_up"),
                self.lora_scale, layout.token, layout.pair, layout.ends, layout.counts, extra_rows, self.keep_merged,
                every_expert)
            gate, up = both.split(self.d_hidden, 1)  # (S, h) each, views of (S, 2h)
            if every_expert:
                for name, table in zip(("gate", "up"), projected):
                    projections[name] = table.view(T, self.num_experts, table.shape[1] // self.num_experts)
        else:
            up = project("up", self.frozen("b_up"))
            gate = project("gate") if self.w_gate is not None else None
        hidden = self._hidden(up, gate, None)
        gated = self._apply_gates(hidden, slot_gates)
        if observe is not None:
            observe(layout, ExpertComputation(x, up, gate, hidden, gated, slot_gates, projections, extra_rows))
        a, b = self._lora_factors("down")
        return down_projection.apply(gated, weight("w_down"), a, b, self.lora_scale, layout.token, layout.pair, T,
                                     layout.ends, layout.counts, extra_rows, *merged_args, every_expert)

    def _routed_experts_unmerged(self, x: torch.Tensor, layout: SlotLayout, slot_gates: torch.Tensor,
                                 observe: ExpertObserver | None = None) -> torch.Tensor:
        """Without gradients: each slot through its expert's frozen weight plus s (x A_e) B_e, no merged
        weight. x: (T, d); slot_gates: (S,) -> (T, d)."""
        inputs = x.index_select(0, layout.token)  # (S, d), sorted by expert

        def project(name: str, values: torch.Tensor) -> torch.Tensor:  # (S, in) -> (S, out)
            a, b = self._lora_factors(name)
            out = frozen_product(values, getattr(self, f"w_{name}"), layout.ends, layout.counts)
            low_rank = grouped_mm(grouped_mm(values, a, layout.ends, layout.counts), b, layout.ends, layout.counts)
            return out.add_(low_rank, alpha=self.lora_scale)

        up = project("up", inputs)
        if self.b_up is not None:
            up = up + self.frozen("b_up").index_select(0, layout.expert)
        gate = project("gate", inputs) if self.w_gate is not None else None
        activation = self._hidden(up, gate, None)
        # straight-through gates are exactly 1
        gated = activation if self.gate_mode == "straight_through" else activation * slot_gates.unsqueeze(1)
        if observe is not None:
            observe(layout, ExpertComputation(x, up, gate, activation, gated, slot_gates, {}, ExtraRows()))
        return x.new_zeros(x.shape).index_add_(0, layout.token, project("down", gated))

    def _all_experts(self, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """Every expert on every token as one wide FFN through the merged weights W + s A B
        (``grouped_lora``'s dense projections). x: (T, d); gates: (T, E) or None -> (T, d)."""
        if not self._merge_pays(x.shape[0] * self.num_experts):
            return self._all_experts_unmerged(x, gates)

        def project(name: str, bias: torch.Tensor | None = None) -> torch.Tensor:  # (T, E, h)
            a, b = self._lora_factors(name)
            out, _ = DenseUpProjection.apply(x, a, self.frozen(f"w_{name}"), b, bias, self.lora_scale, self.keep_merged)
            return out

        hidden = self._hidden(project("up", self.frozen("b_up")), project("gate") if self.w_gate is not None else None, None)
        if gates is not None:
            hidden = self._apply_gates(hidden, gates)
        a, b = self._lora_factors("down")
        return DenseDownProjection.apply(hidden, self.frozen("w_down"), a, b, self.lora_scale, self.keep_merged)

    def _all_experts_unmerged(self, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """Without gradients, for few tokens: every expert's frozen weight plus s (x A_e) B_e, batched over
        experts, no merged weight. x: (T, d); gates: (T, E) or None -> (T, d)."""

        def project(name: str, values: torch.Tensor) -> torch.Tensor:  # (E or 1, T, in) -> (E, T, out)
            a, b = self._lora_factors(name)
            weight = getattr(self, f"w_{name}")  # in its own dtype: a bf16 expert runs in bf16, its LoRA apart
            frozen = torch.matmul(values.to(weight.dtype), weight).to(values.dtype)
            return frozen.add_(torch.matmul(torch.matmul(values, a), b), alpha=self.lora_scale)

        up = project("up", x.unsqueeze(0))
        if self.b_up is not None:
            up = up + self.frozen("b_up").unsqueeze(1)
        gate = project("gate", x.unsqueeze(0)) if self.w_gate is not None else None
        hidden = self._hidden(up, gate, None)  # (E, T, h)
        if gates is not None:  # straight-through gates: value 1, and still the router's gradient in training
            hidden = self._apply_gates(hidden, gates.T)
        return project("down", hidden).sum(0)


class _UnitGate(torch.autograd.Function):
    """hidden * gates for gates whose value is exactly 1 (straight-through): the forward returns hidden
    unchanged, the backward gives hidden the gradient as it is and the gates sum(hidden * grad, -1).

    hidden: (..., h), gates: (...) -> (..., h).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(hidden)
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (hidden,) = ctx.saved_tensors
        return grad, (hidden * grad).sum(-1) if ctx.needs_input_grad[1] else None
