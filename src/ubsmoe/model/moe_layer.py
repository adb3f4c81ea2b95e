"""The sparse Mixture-of-Experts FFN: stacked experts with per-expert LoRA, top-K routing chosen per call.

One layer object serves every client: ``top_k`` is set before each use (a weak client's K_c, a strong
client's K_max). Tokens are grouped by expert with one sort per layer, the experts run as grouped
matmuls over their tokens, and outputs are scattered back with ``index_add``: compute scales with K,
and no token is dropped. Padding tokens (``RoutingContext.token_mask``) are neither routed nor counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ubsmoe.model.grouped_lora import (DenseDownProjection, DenseUpProjection, GroupedDownProjection,
                                       GroupedUpProjection, UnmergedDownProjection, UnmergedUpProjection,
                                       frozen_product, grouped_mm)
from ubsmoe.model.lora import kaiming_uniform
from ubsmoe.model.matmul import NarrowLinear

GATE_MODES = ("straight_through", "softmax", "softmax_renorm")
# Largest E d h (numbers per stacked expert matrix) that training merges into W + s A B: 16 M numbers, 64 MB in
# float32 per matrix (MiniLM's and SmolLM2's upcycled layers are below 1 M; OLMoE's 134 M are above).
MERGE_LIMIT = 2**24


@dataclass
class RoutingContext:
    """State shared by all MoE layers of one model during one forward pass.

    token_mask: (batch, seq) bool, True for real tokens; None means every position is a token.
    """

    token_mask: torch.Tensor | None = None


@dataclass
class RoutingRecord:
    """What one forward pass of one layer routed; kept until the next forward for losses and hooks.

    All tensors cover the T non-padding tokens of the batch, in row-major (batch, seq) order.
    scores: (T, E) raw router scores s; logits: (T, E) the logits the probabilities come from (s, or
    s + modulation); probs: (T, E) softmax(logits), differentiable; experts: (T, K) selected experts;
    gates: (T, K) the gate values the expert outputs were multiplied by.
    """

    scores: torch.Tensor
    logits: torch.Tensor
    probs: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor


class RoutingCounter:
    """Running routing statistics of one layer: what DMR uploads and what balance metrics read.

    routed: (E,) tokens routed to each expert; tokens: non-padding tokens seen; prob_sum: (E,) sum over
    tokens of the router probability of each expert. The sums stay where the routing runs (no copy to the
    CPU, and so no GPU synchronisation, per forward); ``routed`` and ``prob_sum`` read them as CPU float64.
    """

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self._routed: torch.Tensor | None = None
        self._prob_sum: torch.Tensor | None = None
        self.tokens = 0

    def add(self, experts: torch.Tensor, probs: torch.Tensor) -> None:
        """experts: (T, K) selected experts; probs: (T, E) router probabilities."""
        routed = torch.bincount(experts.reshape(-1), minlength=self.num_experts).to(torch.float64)
        prob_sum = probs.detach().sum(0).to(torch.float64)
        self._routed = routed if self._routed is None else self._routed + routed
        self._prob_sum = prob_sum if self._prob_sum is None else self._prob_sum + prob_sum
        self.tokens += experts.shape[0]

    @property
    def routed(self) -> torch.Tensor:
        return torch.zeros(self.num_experts, dtype=torch.float64) if self._routed is None else self._routed.cpu()

    @property
    def prob_sum(self) -> torch.Tensor:
        return torch.zeros(self.num_experts, dtype=torch.float64) if self._prob_sum is None else self._prob_sum.cpu()


class MoEHook:
    """Extension points for federated methods; every method is a no-op here.

    A method subclasses this and overrides only what it needs, then attaches it with
    ``SparseMoEFFN.hooks.append``. The layer calls the hooks in order.
    """

    def modulate(
        self, layer: "SparseMoEFFN", select: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map (selection scores, probability logits), both (T, E), to new ones; both start as the raw
        router scores. Selection scores decide the top-K; probability logits feed the softmax (DMR
        changes both, a selection bias only the first)."""
        return select, logits

    def observe_experts(
        self, layer: "SparseMoEFFN", layout: "SlotLayout", tensors: dict[str, torch.Tensor]
    ) -> None:
        """See the experts' computation on the S slots of ``layout`` (the token of slot s is
        ``layout.token[s]``): tensors holds ``tokens`` (T, d) the layer's input, ``up`` and ``gate``
        (S, h) the projections (``gate`` None for ungated FFNs), ``activation`` (S, h) after the
        activation, ``hidden`` (S, h) the activation times the gate (what the down-projection reads),
        ``gates`` (S,), ``projected`` {"up", "gate": (T, E, r)} every token's LoRA input projection
        x A_e for every expert, and ``extra_rows``, a dict shared with the layer's backward: a hook may
        set ``extra_rows["up"]`` / ``["gate"]`` (T, E*r), added to the rows whose product x^T rows is the
        gradient of every A_e of that matrix (before the backward reaches it: in a gradient hook of the
        projection's output), and ``extra_rows["down"]`` (T, E*r), added to the rows whose product
        rows^T g with the layer's output gradient g is the gradient of every B_e of the down-projection
        (here, in the forward). The backward leaves ``extra_rows["down_through_b"]`` (T, E*r):
        s g(x) B_e^T for every token and expert.
        Register tensor hooks here to capture per-token gradients (pseudo-gradients)."""

    def training_flops(self, layer: "SparseMoEFFN", tokens: int) -> float:
        """Matmul FLOPs the hook adds to one training step of the layer on ``tokens`` real tokens (the FLOP
        counter adds them); 0 unless the hook computes something of size."""
        return 0.0

    def adjust_output(self, layer: "SparseMoEFFN", output: torch.Tensor, record: RoutingRecord) -> torch.Tensor:
        """Change the combined output (T, d) of the routed tokens (default outputs, rescaling), or
        register a hook on it to capture the gradient arriving at the layer's output."""
        return output


class SparseMoEFFN(nn.Module):
    """A feed-forward block of ``num_experts`` experts, each with its own LoRA, routed top-K per token.

    Frozen expert weights are stacked: ``w_up: (E, d, h)``, optional ``w_gate: (E, d, h)`` for gated
    (SwiGLU) FFNs, optional ``b_up: (E, h)``, ``w_down: (E, h, d)``, optional shared ``b_down: (d,)``.
    Every stacked matrix ``W`` gets stacked LoRA factors ``lora_<name>_a: (E, in, r)`` and
    ``lora_<name>_b: (E, r, out)``. With one expert the block is a dense FFN and has no router.
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
        router_weight: torch.Tensor | None = None,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        gate_mode: str = "straight_through",
        context: RoutingContext | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        num_experts, d_model, d_hidden = w_up.shape
        if w_down.shape != (num_experts, d_hidden, d_model):
            raise ValueError(f"w_down must be {(num_experts, d_hidden, d_model)}, got {tuple(w_down.shape)}")
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
        if num_experts > 1 and router_weight is None:
            raise ValueError("a layer with several experts needs router_weight of shape (num_experts, d_model)")
        self.num_experts, self.d_model, self.d_hidden = num_experts, d_model, d_hidden
        self.activation = activation
        self.gate_mode = gate_mode
        self.context = context or RoutingContext()
        self.lora_rank = lora_rank
        self.lora_scale = lora_alpha / lora_rank
        self.active_rank = lora_rank
        self.top_k = num_experts
        self.beside_shared = False  # routed experts beside an upcycled shared part (``UpcycledSharedMoE``): K may be 0
        self.merge_limit = MERGE_LIMIT

        # The frozen tensors are taken as they are, views included (a native MoE's transposed experts): no copy
        frozen = lambda t: None if t is None else nn.Parameter(t.detach(), requires_grad=False)  # noqa: E731
        self.w_up, self.w_gate, self.w_down = frozen(w_up), frozen(w_gate), frozen(w_down)
        self.b_up, self.b_down = frozen(b_up), frozen(b_down)
        self.router = None
        if num_experts > 1:
            self.router = nn.Linear(d_model, num_experts, bias=False)
            with torch.no_grad():
                self.router.weight.copy_(router_weight)
            # Per-expert routing-logit modulation (DMR's phi): frozen and unused unless a method's hook
            # applies it and unfreezes it, so that it trains and travels with the other tensors.
            self.modulation = nn.Parameter(torch.zeros(num_experts), requires_grad=False)

        self.adapted = ["up", "down"] + (["gate"] if w_gate is not None else [])
        for name in self.adapted:
            d_in, d_out = (d_hidden, d_model) if name == "down" else (d_model, d_hidden)
            a = kaiming_uniform((num_experts, d_in, lora_rank), d_in, generator)
            self.register_parameter(f"lora_{name}_a", nn.Parameter(a))
            self.register_parameter(f"lora_{name}_b", nn.Parameter(torch.zeros(num_experts, lora_rank, d_out)))

        self.hooks: list[MoEHook] = []
        self.counter = RoutingCounter(num_experts)
        self.last_routing: RoutingRecord | None = None

    # ------------------------------------------------------------------ configuration
    def set_top_k(self, k: int) -> None:
        """Activate ``k`` experts per token from now on (1 <= k <= num_experts; 0 for routed experts beside an
        always-on shared part, which then runs alone)."""
        lowest = 0 if self.beside_shared else 1
        if not isinstance(k, int) or not lowest <= k <= self.num_experts:
            raise ValueError(f"top-K must be an integer in [{lowest}, {self.num_experts}] (the layer has "
                             f"{self.num_experts} experts), got {k!r}")
        self.top_k = k

    def lora_parameters_per_expert(self) -> int:
        """Trainable LoRA numbers of one expert: r * (in + out) for every adapted matrix."""
        return len(self.adapted) * self.lora_rank * (self.d_hidden + self.d_model)

    # ------------------------------------------------------------------ forward
    def frozen(self, name: str) -> torch.Tensor | None:
        """Frozen tensor ``w_up``, ``w_gate``, ``w_down``, ``b_up`` or ``b_down`` in the dtype the layer computes
        in (its LoRA factors'): a bf16 model's experts are upcast for the call, so that W + s A B is formed in
        float32 and no update is folded into bf16 weights."""
        tensor = getattr(self, name)
        compute = self.lora_up_a.dtype
        return tensor if tensor is None or tensor.dtype == compute else tensor.to(compute)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (batch, seq, d) -> (batch, seq, d); padding positions get zeros (plus ``b_down``).
        Computes in the LoRA factors' dtype (float32) and returns ``hidden``'s dtype."""
        shape, dtype = hidden.shape, hidden.dtype
        compute = self.lora_up_a.dtype
        if dtype != compute:
            return self.forward(hidden.to(compute)).to(dtype)
        flat = hidden.reshape(-1, self.d_model)
        mask = self.context.token_mask
        token_index = None
        if mask is not None and not bool(mask.all()):  # with no padding in the batch, no gather or scatter
            token_index = mask.reshape(-1).nonzero().squeeze(1)
            x = flat.index_select(0, token_index)
        else:
            x = flat
        y = self._route_and_compute(x)
        if token_index is not None:
            y = torch.zeros_like(flat).index_copy(0, token_index, y)
        if self.b_down is not None:
            y = y + self.frozen("b_down")
        return y.reshape(shape)

    def _route_and_compute(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, d) real tokens -> (T, d) combined expert outputs (without ``b_down``)."""
        if self.router is None:
            return self._all_experts(x, None)
        if self.top_k == 0:  # the shared part beside this layer runs alone: nothing routed, nothing counted
            self.last_routing = None
            return x.new_zeros(x.shape)
        scores = NarrowLinear.apply(x, self.router.weight)  # (T, E): x W_rᵀ in MKL's fast orientation
        select, logits = scores, scores
        for hook in self.hooks:
            select, logits = hook.modulate(self, select, logits)
        probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(x.dtype)
        experts = select.topk(self.top_k, dim=-1).indices  # (T, K)
        gates = probs.gather(1, experts)
        if self.gate_mode == "straight_through":
            gates = gates - gates.detach() + 1.0  # value exactly 1, gradient d/dp to the router
        elif self.gate_mode == "softmax_renorm":
            gates = gates / gates.sum(-1, keepdim=True)
        record = RoutingRecord(scores, logits, probs, experts, gates)
        self.last_routing = record
        self.counter.add(experts, probs)
        if self.top_k == self.num_experts:
            # Every expert takes every token: no sort or gather, the dense FFN's compute exactly.
            by_expert = torch.empty_like(gates).scatter(1, experts, gates)  # (T, E) in expert order
            y = self._all_experts(x, by_expert)
        else:
            layout = SlotLayout.from_experts(experts, self.num_experts)
            slot_gates = gates.reshape(-1).index_select(0, layout.order)
            if self._merge_pays(layout.token.shape[0]):
                y = self._routed_experts(x, layout, slot_gates, merged=True)
            elif torch.is_grad_enabled():
                y = self._routed_experts(x, layout, slot_gates, merged=False)
            else:
                y = self._routed_experts_unmerged(x, layout, slot_gates)
        for hook in self.hooks:
            y = hook.adjust_output(self, y, record)
        return y

    def _lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The active ranks of matrix ``name``'s stacked LoRA: a (E, in, r), b (E, r, out)."""
        a, b = getattr(self, f"lora_{name}_a"), getattr(self, f"lora_{name}_b")
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

    def _routed_experts(self, x: torch.Tensor, layout: "SlotLayout", slot_gates: torch.Tensor,
                        merged: bool = True) -> torch.Tensor:
        """Experts on their slots, grouped by expert. x: (T, d); slot_gates: (S,) -> (T, d).

        Each projection runs through its merged weight W + s A B (``grouped_lora``), or, for experts too large
        to merge them all (``merged=False``), through the frozen weight with the LoRA apart, so that memory
        grows with K; the gate multiplies the hidden activation (S, h/E) rather than the output (S, d): the
        same value over fewer numbers.
        """
        T = x.shape[0]
        extra_rows: dict[str, torch.Tensor] = {}  # what hooks add to the LoRA weight gradients, and read back
        projections = {}
        up_projection = GroupedUpProjection if merged else UnmergedUpProjection
        down_projection = GroupedDownProjection if merged else UnmergedDownProjection
        weight = self.frozen if merged else (lambda name: getattr(self, name))  # unmerged: w in its own dtype

        def project(name: str, bias: torch.Tensor | None = None) -> torch.Tensor:  # (S, h)
            a, b = self._lora_factors(name)
            out, projected = up_projection.apply(x, a, weight(f"w_{name}"), b, bias, self.lora_scale,
                                                 layout.token, layout.pair, layout.ends, layout.counts, name,
                                                 extra_rows)
            projections[name] = projected.view(T, self.num_experts, projected.shape[1] // self.num_experts)
            return out

        up = project("up", self.frozen("b_up"))
        gate = project("gate") if self.w_gate is not None else None
        hidden = self._hidden(up, gate, None)
        gated = self._apply_gates(hidden, slot_gates)
        if self.hooks:
            tensors = {"tokens": x, "up": up, "gate": gate, "activation": hidden, "hidden": gated, "gates": slot_gates,
                       "projected": projections, "extra_rows": extra_rows}
            for hook in self.hooks:
                hook.observe_experts(self, layout, tensors)
        a, b = self._lora_factors("down")
        return down_projection.apply(gated, weight("w_down"), a, b, self.lora_scale, layout.token, layout.pair, T,
                                     layout.ends, layout.counts, extra_rows)

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

    def _routed_experts_unmerged(self, x: torch.Tensor, layout: "SlotLayout", slot_gates: torch.Tensor) -> torch.Tensor:
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
        if self.hooks:
            tensors = {"tokens": x, "up": up, "gate": gate, "activation": activation, "hidden": gated,
                       "gates": slot_gates, "projected": {}, "extra_rows": {}}
            for hook in self.hooks:
                hook.observe_experts(self, layout, tensors)
        return x.new_zeros(x.shape).index_add_(0, layout.token, project("down", gated))

    def _all_experts(self, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """Every expert on every token as one wide FFN through the merged weights W + s A B
        (``grouped_lora``'s dense projections). x: (T, d); gates: (T, E) or None -> (T, d)."""
        if not self._merge_pays(x.shape[0] * self.num_experts):
            return self._all_experts_unmerged(x, gates)

        def project(name: str, bias: torch.Tensor | None = None) -> torch.Tensor:  # (T, E, h)
            a, b = self._lora_factors(name)
            out, _ = DenseUpProjection.apply(x, a, self.frozen(f"w_{name}"), b, bias, self.lora_scale)
            return out

        hidden = self._hidden(project("up", self.frozen("b_up")), project("gate") if self.w_gate is not None else None, None)
        if gates is not None:
            hidden = self._apply_gates(hidden, gates)
        a, b = self._lora_factors("down")
        return DenseDownProjection.apply(hidden, self.frozen("w_down"), a, b, self.lora_scale)

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
