"""The sparse Mixture-of-Experts FFN (grouped LoRA experts behind a top-K router) and its method hooks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ubsmoe.model.expert_observation import ExpertComputation
from ubsmoe.model.grouped_experts import MERGE_LIMIT, GroupedExperts, SlotLayout
from ubsmoe.model.router import GATE_MODES, RoutingCounter, RoutingRecord, TopKRouter


@dataclass
class RoutingContext:
    """State shared by all MoE layers of one model during one forward pass.

    token_mask: (batch, seq) bool, True for real tokens; None means every position is a token.
    """

    token_mask: torch.Tensor | None = None


class MoEHook:
    """Extension points for federated methods; every method is a no-op here.

    A method subclasses this and overrides only what it needs, then attaches it with
    ``SparseMoEFFN.hooks.append``. The layer calls the hooks in order.

    ``reads_every_expert``: the hook reads x A_e for every token and expert (``ExpertComputation.projected``),
    ``ExtraRows.down_through_b`` or adds ``ExtraRows`` rows, so the layer takes its model-width LoRA
    products over every (token, expert) pair; otherwise over the slots that ran, a K / E share of them.
    """

    reads_every_expert: bool = False

    def modulate(
        self, layer: "SparseMoEFFN", select: torch.Tensor, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map (selection scores, probability logits), both (T, E), to new ones; both start as the raw
        router scores. Selection scores decide the top-K; probability logits feed the softmax (DMR
        changes both, a selection bias only the first)."""
        return select, logits

    def observe_experts(self, layer: "SparseMoEFFN", layout: "SlotLayout", seen: ExpertComputation) -> None:
        """See the experts' computation on the S slots of ``layout`` (``ExpertComputation``), and add rows to
        every expert's LoRA weight gradients through ``seen.extra_rows`` (``ExtraRows``; only a hook that sets
        ``reads_every_expert``). Register tensor hooks here to capture per-token gradients (pseudo-gradients)."""

    def training_flops(self, layer: "SparseMoEFFN", tokens: int) -> float:
        """Matmul FLOPs the hook adds to one training step of the layer on ``tokens`` real tokens (the FLOP
        counter adds them); 0 unless the hook computes something of size."""
        return 0.0

    def adjust_output(self, layer: "SparseMoEFFN", output: torch.Tensor, record: RoutingRecord) -> torch.Tensor:
        """Change the combined output (T, d) of the routed tokens (default outputs, rescaling), or
        register a hook on it to capture the gradient arriving at the layer's output."""
        return output


class SparseMoEFFN(GroupedExperts):
    """A feed-forward block of ``num_experts`` experts, each with its own LoRA, routed top-K per token.

    forward(hidden (batch, seq, d)) -> (batch, seq, d). The experts (stacked weights ``w_up: (E, d, h)``, ...,
    LoRA factors ``lora_<name>_a: (E, in, r)``, ``lora_<name>_b: (E, r, out)``) and their compute paths are
    ``GroupedExperts``', inherited so that the parameters keep their names; ``router`` is a ``TopKRouter``
    (``router.weight``: (E, d)), None with one expert (the block is then a dense FFN). A method's own
    per-layer state (DMR's φ, A3SMoE's output scale, Default MoE's defaults) is attached by the method's
    ``prepare_model``, and read by its hooks.

    One layer object serves every client: ``top_k`` is set before each use (a weak client's K_c, a strong
    client's K_max); compute scales with K, and no token is dropped. Padding tokens
    (``context.token_mask``) are neither routed nor counted. ``hooks`` run in order on every forward;
    ``counter`` sums the routing over forwards, ``last_routing`` records the last one's.
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
        super().__init__(w_up, w_down, activation, w_gate=w_gate, b_up=b_up, b_down=b_down, gate_mode=gate_mode,
                         merge_limit=MERGE_LIMIT)
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
        num_experts = self.num_experts
        if num_experts > 1 and router_weight is None:
            raise ValueError("a layer with several experts needs router_weight of shape (num_experts, d_model)")
        self.context = context or RoutingContext()
        self.top_k = num_experts
        self.beside_shared = False  # routed experts beside an upcycled shared part (``UpcycledSharedMoE``): K may be 0
        self.router = None
        if num_experts > 1:
            self.router = TopKRouter(self.d_model, num_experts, router_weight)
        # The LoRA factors last: parameters keep the order checkpoints and the trainable state list them in
        # (frozen experts, LoRA; what a method attaches follows), and the router's initialisation draws first
        # from the global generator.
        self.add_lora(lora_rank, lora_alpha, generator)
        self.hooks: list[MoEHook] = []
        self.counter = RoutingCounter(num_experts)
        self.last_routing: RoutingRecord | None = None

    def set_top_k(self, k: int) -> None:
        """Activate ``k`` experts per token from now on (1 <= k <= num_experts; 0 for routed experts beside an
        always-on shared part, which then runs alone)."""
        lowest = 0 if self.beside_shared else 1
        if not isinstance(k, int) or not lowest <= k <= self.num_experts:
            raise ValueError(f"top-K must be an integer in [{lowest}, {self.num_experts}] (the layer has "
                             f"{self.num_experts} experts), got {k!r}")
        self.top_k = k

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
            # index_put rather than index_copy: the same values and gradients, but autograd keeps only the
            # index for the backward, where index_copy keeps y as well (T, d) in every layer
            y = torch.zeros_like(flat).index_put((token_index,), y)
        if self.b_down is not None:
            y = y + self.frozen("b_down")
        return y.reshape(shape)

    def _route_and_compute(self, x: torch.Tensor) -> torch.Tensor:
        """x: (T, d) real tokens -> (T, d) combined expert outputs (without ``b_down``)."""
        if self.router is None:
            return self.expert_outputs(x)
        if self.top_k == 0:  # the shared part beside this layer runs alone: nothing routed, nothing counted
            self.last_routing = None
            return x.new_zeros(x.shape)
        record = self.router.route(x, self.top_k, self.gate_mode, self._modulate)
        self.last_routing = record
        self.counter.add(record.experts, record.probs)
        y = self.expert_outputs(x, record.experts, record.gates, self._observe_experts if self.hooks else None,
                                self.reads_every_expert())
        for hook in self.hooks:
            y = hook.adjust_output(self, y, record)
        return y

    def reads_every_expert(self) -> bool:
        """Whether a hook reads every expert's LoRA products (``MoEHook.reads_every_expert``)."""
        return any(hook.reads_every_expert for hook in self.hooks)

    def _modulate(self, select: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The hooks' modulation of (selection scores, probability logits), both (T, E), in order."""
        for hook in self.hooks:
            select, logits = hook.modulate(self, select, logits)
        return select, logits

    def _observe_experts(self, layout: SlotLayout, seen: ExpertComputation) -> None:
        """Show the hooks the experts' computation on the S slots of ``layout`` (``MoEHook.observe_experts``)."""
        for hook in self.hooks:
            hook.observe_experts(self, layout, seen)
        rows = seen.extra_rows
        if not self.reads_every_expert() and any(r is not None for r in (rows.up, rows.gate, rows.down)):
            raise RuntimeError("a hook added ExtraRows to a layer computing its LoRA products per slot: hooks that "
                               "add rows must set reads_every_expert")
