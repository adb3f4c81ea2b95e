"""What the heterogeneous-LoRA-rank methods share: the model's adapters, ranks, products and merges.

An adapter is one LoRA pair on one frozen matrix W (in, out): ``a: (..., in, r)`` and ``b: (..., r, out)``
(leading dimensions: the expert axis of a stacked FFN matrix, absent for attention projections), with
update ``scale * a @ b``. Rank truncation keeps the first ranks; the scale stays ``alpha / r_max``, so a
truncated adapter is a prefix of the full one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ubsmoe.methods.base import (
    ClientInfo, ClientUpdate, FederatedMethod, Params, ServerState, tensor_bytes, top_k_for_budget,
    weighted_delta_average,
)
from ubsmoe.model import MoEModel, ModelSpec
from ubsmoe.model.lora import LoRALinear


@dataclass(frozen=True)
class Adapter:
    """One LoRA pair of the model, by the names of its factors in ``trainable_state``."""

    a: str
    b: str
    scale: float
    base: str  # "linear" (nn.Linear weight (out, in)) or "stacked" (expert weights (E, in, out))
    weight: str  # parameter name of the frozen matrix the update merges into

    def product(self, params: Params, rank: int | None = None) -> torch.Tensor:
        """The update ``scale * a[..., :rank] @ b[..., :rank, :]``: (..., in, out)."""
        a, b = params[self.a], params[self.b]
        if rank is not None:
            a, b = a[..., :rank], b[..., :rank, :]
        return self.scale * (a @ b)


def adapters(model: MoEModel) -> list[Adapter]:
    """Every LoRA pair of the model: attention projections and the FFN matrices."""
    name = model.state_name
    found = []
    for module in model.modules():
        if isinstance(module, LoRALinear):
            found.append(Adapter(name(module.lora_a), name(module.lora_b), module.scale, "linear",
                                 name(module.base.weight)))
    for layer in model.moe_layers:
        for matrix in layer.adapted:
            found.append(Adapter(name(getattr(layer, f"lora_{matrix}_a")), name(getattr(layer, f"lora_{matrix}_b")),
                                 layer.lora_scale, "stacked", name(getattr(layer, f"w_{matrix}"))))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return [a for a in found if a.a in trainable and a.b in trainable]


def set_rank(model: MoEModel, rank: int) -> None:
    """Every adapter of the model uses its first ``rank`` ranks from now on."""
    for module in model.modules():
        if isinstance(module, LoRALinear):
            if not 1 <= rank <= module.rank:
                raise ValueError(f"LoRA rank must be in [1, {module.rank}], got {rank}")
            module.active_rank = rank
    for layer in model.moe_layers:
        layer.active_rank = rank


def rank_for_budget(r_max: int, budget: float) -> int:
    """r_c = max(1, floor(r_max * beta)): the same rule as the sparse methods' K_c."""
    return top_k_for_budget(r_max, budget)


def truncated(params: Params, adapter: Adapter, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's factors with the ranks from ``rank`` on set to zero (zero-padded to r_max)."""
    a, b = params[adapter.a].clone(), params[adapter.b].clone()
    a[..., rank:] = 0
    b[..., rank:, :] = 0
    return a, b


def factors_from_svd(svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int, r_max: int, scale: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-``rank`` factors of an update (..., in, out) given its thin SVD (u, s, vh),
    zero-padded to ``r_max`` ranks: a = U_r (orthonormal columns), b = S_r V_r^T / scale, so that
    scale * a @ b is the truncated SVD."""
    u, s, vh = svd
    rank = min(rank, s.shape[-1])
    a = u.new_zeros(*u.shape[:-1], r_max)
    b = vh.new_zeros(*vh.shape[:-2], r_max, vh.shape[-1])
    a[..., :rank] = u[..., :rank]
    b[..., :rank, :] = s[..., :rank, None] * vh[..., :rank, :] / scale
    return a, b


def merge_into_base(model: MoEModel, adapter: Adapter, update: torch.Tensor) -> None:
    """Add ``update`` (..., in, out) to the frozen matrix the adapter sits on."""
    weight = dict(model.named_parameters())[adapter.weight]
    with torch.no_grad():
        if adapter.base == "linear":
            weight.add_(update.transpose(-1, -2).to(weight.dtype))
        else:
            weight.add_(update.to(weight.dtype))


class HeterogeneousRankMethod(FederatedMethod):
    """Base of the heterogeneous-rank baselines: the dense backbone (one expert per FFN), every adapter
    allocated at r_max = ``model.lora_rank``, client c training its first r_c = max(1, floor(r_max beta_c))
    ranks. Subclasses say how ranks are handed out and how the server aggregates."""

    def model_spec(self, spec: ModelSpec) -> ModelSpec:
        self.r_max = spec.lora_rank
        return replace(spec, num_experts=1)

    def initial_state(self, model: MoEModel) -> ServerState:
        self.adapters = adapters(model)
        if not self.adapters:
            raise RuntimeError(f"{self.name} needs a model with LoRA adapters")
        return ServerState(params=model.trainable_state())

    def client_rank(self, client: ClientInfo) -> int:
        return rank_for_budget(self.r_max, client.budget)

    def eval_key(self, budget: float) -> int | str:
        """A tier's model is the global one at the tier's rank r_c."""
        return rank_for_budget(self.r_max, budget)

    def setup_client(self, model: MoEModel, client: ClientInfo) -> None:
        set_rank(model, self.client_rank(client))

    def teardown_client(self, model: MoEModel, client: ClientInfo) -> None:
        set_rank(model, self.r_max)

    def adapter_names(self) -> set[str]:
        return {name for adapter in self.adapters for name in (adapter.a, adapter.b)}

    def _rank_payload_bytes(self, params: Params, rank: int) -> int:
        """Bytes of the adapters at ``rank`` (the zero-padded tail is not sent) plus every other tensor."""
        names = self.adapter_names()
        total = tensor_bytes([v for n, v in params.items() if n not in names])
        for adapter in self.adapters:
            a, b = params[adapter.a], params[adapter.b]
            total += (a[..., :rank].numel() + b[..., :rank, :].numel()) * a.element_size()
        return total

    def download_bytes(self, state: ServerState, client: ClientInfo) -> int:
        return self._rank_payload_bytes(self.client_params(state, client), self.client_rank(client))

    def upload_bytes(self, update: ClientUpdate) -> int:
        return self._rank_payload_bytes(update.delta, update.extra.get("rank", self.client_rank(update.client)))

    def average_others(self, state: ServerState, updates: list[ClientUpdate]) -> Params:
        """FedAvg by data size of every tensor that is not a LoRA factor (the task head)."""
        names = self.adapter_names()
        others = {n: v for n, v in state.params.items() if n not in names}
        return weighted_delta_average(others, updates)


class MergingMethod(HeterogeneousRankMethod):
    """Base of the methods that merge each round's aggregated update into the frozen base weights
    (FLoRA, FLoRIST): every client starts each round from the same fresh adapters (the initial ones,
    b = 0) at its rank r_c on top of the merged base, so every tier holds the same model. Tiers are still
    evaluated one by one (the key is the rank): their predictions agree, but each runs its own rank-r_c
    adapter, and its inference FLOPs are counted at that rank.

    In simulation all clients share one model object, so the server's merge into its base is what each
    client would do on its own copy after receiving the broadcast update.
    """

    def initial_state(self, model: MoEModel) -> ServerState:
        state = super().initial_state(model)
        self.model = model
        self.fresh = {n: state.params[n].clone() for n in self.adapter_names()}
        return state

    def round_update(self, adapter: Adapter, factors: list[tuple[torch.Tensor, torch.Tensor]],
                     sizes: list[int]) -> tuple[torch.Tensor, dict]:
        """The update (..., in, out) to merge, from the clients' trained factors truncated to their
        ranks (a_c (..., in, r_c), b_c (..., r_c, out)) and data sizes; plus what to record."""
        raise NotImplementedError

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        if not updates:
            return state
        params = self.average_others(state, updates)
        sizes = [u.client.num_examples for u in updates]
        records = {}
        for adapter in self.adapters:
            factors = []
            for u in updates:
                rank = self.client_rank(u.client)
                a = state.params[adapter.a] + u.delta[adapter.a]
                b = state.params[adapter.b] + u.delta[adapter.b]
                factors.append((a[..., :rank], b[..., :rank, :]))
            update, record = self.round_update(adapter, factors, sizes)
            merge_into_base(self.model, adapter, update)
            records[adapter.a] = record
            params[adapter.a], params[adapter.b] = self.fresh[adapter.a], self.fresh[adapter.b]
        return replace(state, params=params, extra={"adapters": records})

    def download_bytes(self, state: ServerState, client: ClientInfo) -> int:
        """The other tensors plus the last round's broadcast update in factored form (``broadcast_rank``
        ranks per adapter); the fresh adapters come from the shared seed and are not sent."""
        names = self.adapter_names()
        total = tensor_bytes([v for n, v in state.params.items() if n not in names])
        for adapter in self.adapters:
            rank = state.extra.get("adapters", {}).get(adapter.a, {}).get("broadcast_rank", 0)
            a, b = state.params[adapter.a], state.params[adapter.b]
            lead = a[..., 0, 0].numel()
            total += lead * rank * (a.shape[-2] + b.shape[-1]) * a.element_size()
        return total

    def round_report(self, state: ServerState) -> dict:
        return {"merged": state.extra.get("adapters", {})}
