"""What the heterogeneous-LoRA-rank methods share: the model's adapters, ranks, products and merges.

An adapter is one LoRA pair on one frozen matrix W (in, out): ``a: (..., in, r)`` and ``b: (..., r, out)``
(leading dimensions: the expert axis of a stacked FFN matrix, absent for attention projections), with
update ``scale * a @ b``. Rank truncation keeps the first ranks; the scale stays ``alpha / r_max``, so a
truncated adapter is a prefix of the full one.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ubsmoe.methods.base import (
    ClientInfo, ClientSettings, ClientUpdate, FederatedMethod, Params, ServerState, top_k_for_budget,
    weighted_delta_average,
)
from ubsmoe.methods.records import MethodRecord
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
            weight.add_(update.transpose(-1, -2).to(weight.device, weight.dtype))
        else:
            weight.add_(update.to(weight.device, weight.dtype))


def prefix(tensor: torch.Tensor, adapter_factor: str, rank: int) -> torch.Tensor:
    """The first ``rank`` ranks of a factor: a (..., in, r) -> (..., in, rank); b (..., r, out) -> (..., rank, out)."""
    return tensor[..., :rank] if adapter_factor == "a" else tensor[..., :rank, :]


def zero_padded(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A factor's first ranks (``tensor``) in a zero tensor of the full ``shape``."""
    full = tensor.new_zeros(shape)
    full[tuple(slice(0, n) for n in tensor.shape)] = tensor
    return full


class HeterogeneousRankMethod(FederatedMethod):
    """Base of the heterogeneous-rank baselines: the dense backbone (one expert per FFN), every adapter
    allocated at r_max = ``model.lora_rank``, client c training its first r_c = max(1, floor(r_max beta_c))
    ranks. Subclasses say how ranks are handed out and how the server aggregates.

    On the wire every adapter travels at the client's rank: the server sends its first r_c ranks, the
    client zero-pads them to r_max (``start_params``) and returns the first r_c ranks of its deltas.
    """

    dense, rank_heterogeneous = True, True

    def model_spec(self, spec: ModelSpec) -> ModelSpec:
        self.r_max = spec.lora_rank
        return replace(spec, num_experts=1)

    def prepare_model(self, model: MoEModel) -> None:
        self.adapters = adapters(model)
        if not self.adapters:
            raise RuntimeError(f"{self.name} needs a model with LoRA adapters")

    @property
    def factor_of(self) -> dict[str, str]:
        """Adapter factor name -> "a" or "b"."""
        return {name: factor for ad in self.adapters for name, factor in ((ad.a, "a"), (ad.b, "b"))}

    def tier_settings(self, budget: float) -> ClientSettings:
        return ClientSettings(rank=rank_for_budget(self.r_max, budget))

    def eval_key(self, budget: float) -> int | str:
        """A tier's model is the global one at the tier's rank r_c."""
        return rank_for_budget(self.r_max, budget)

    def at_rank(self, params: Params, rank: int) -> Params:
        """``params`` with every adapter factor cut to its first ``rank`` ranks (what travels)."""
        factor_of = self.factor_of
        return {n: prefix(v, factor_of[n], rank) if n in factor_of else v for n, v in params.items()}

    def client_params(self, state: ServerState, client: ClientInfo) -> Params:
        return self.at_rank(self.full_client_params(state, client), self.client_settings(state, client).rank)

    def full_client_params(self, state: ServerState, client: ClientInfo) -> Params:
        """The tensors the client starts from, at full rank."""
        return state.params

    def eval_params(self, state: ServerState, budget: float) -> Params:
        return self.at_rank(state.params, self.eval_settings(state, budget).rank)

    def start_params(self, model: MoEModel, received: Params, settings: ClientSettings) -> Params:
        factor_of = self.factor_of
        shapes = {n: p.shape for n, p in model.named_parameters() if n in factor_of}
        return {n: zero_padded(v, shapes[n]) if n in factor_of else v for n, v in received.items()}

    def setup_client(self, model: MoEModel, settings: ClientSettings) -> None:
        self.rank = settings.rank
        set_rank(model, settings.rank)

    def teardown_client(self, model: MoEModel) -> None:
        set_rank(model, self.r_max)

    def client_update(self, model: MoEModel, start: Params, client: ClientInfo, settings: ClientSettings,
                      routing) -> ClientUpdate:
        """The deltas, adapters at the client's rank."""
        update = super().client_update(model, start, client, settings, routing)
        update.delta = self.at_rank(update.delta, settings.rank)
        return update

    def adapter_names(self) -> set[str]:
        return set(self.factor_of)

    def trained_factors(self, state: ServerState, update: ClientUpdate, adapter: Adapter
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """A client's trained factors at its rank: the first r_c ranks of what it started from plus its deltas
        (a (..., in, r_c), b (..., r_c, out))."""
        start = self.full_client_params(state, update.client)
        a, b = update.delta[adapter.a], update.delta[adapter.b]
        return prefix(start[adapter.a], "a", a.shape[-1]) + a, prefix(start[adapter.b], "b", b.shape[-2]) + b

    def average_others(self, state: ServerState, updates: list[ClientUpdate]) -> Params:
        """FedAvg by data size of every tensor that is not a LoRA factor (the task head)."""
        names = self.adapter_names()
        others = {n: v for n, v in state.params.items() if n not in names}
        return weighted_delta_average(others, updates)


@dataclass
class FactoredUpdate(MethodRecord):
    """One adapter's update of one round in factored form: pairs (a_i (..., in, r_i), b_i (..., r_i, out))
    whose products make it (one stacked pair for FLoRA, one pair per matrix for FLoRIST)."""

    a: list[torch.Tensor]
    b: list[torch.Tensor]


@dataclass
class MergeRecord(MethodRecord):
    """What a merge of one adapter recorded: the rank of the pair the clients receive (the largest), and
    FLoRIST's energy rank of each matrix's pair."""

    broadcast_rank: int
    ranks: list[int] = field(default_factory=list)


@dataclass
class MergedRounds(MethodRecord):
    """Every round's merged updates, in order: per round, each adapter's (by its a factor's name)
    ``FactoredUpdate``. What a client needs to rebuild the merged base from the original weights."""

    rounds: list[dict[str, FactoredUpdate]] = field(default_factory=list)


@dataclass
class MergingState(MergedRounds):
    """The server state of a merging method: the merged rounds, and what the last merge recorded per adapter."""

    last: dict[str, MergeRecord] = field(default_factory=dict)


class MergingMethod(HeterogeneousRankMethod):
    """Base of the methods that merge each round's aggregated update into the frozen base weights
    (FLoRA, FLoRIST): every client starts each round from the same fresh adapters (the initial ones,
    b = 0) at its rank r_c on top of the merged base, so every tier holds the same model. Tiers are still
    evaluated one by one (the key is the rank): their predictions agree, but each runs its own rank-r_c
    adapter, and its inference FLOPs are counted at that rank.

    Under ``precision=bf16`` the matrices the updates are folded into stay float32 (the rest of the backbone
    is bf16): a round's small update would vanish in a bf16 weight.

    The server keeps every round's merged update in factored form (``MergingState``) and sends them all
    (``frozen_state``): a client that missed rounds, or a fresh process, rebuilds the merged base from the
    original weights (``sync_frozen``), applying each round once and in order. The fresh adapters come from
    the seeded model each side builds.
    """

    merges_into_base = True
    State, Frozen = MergingState, MergedRounds

    def prepare_model(self, model: MoEModel) -> None:
        super().prepare_model(model)
        params = dict(model.named_parameters())
        with torch.no_grad():  # each round's update is folded into these: never into bf16 weights
            for adapter in self.adapters:
                weight = params[adapter.weight]
                if weight.dtype != params[adapter.a].dtype:
                    weight.data = weight.data.to(params[adapter.a].dtype)
        trainable = model.trainable_state()
        self.fresh = {n: trainable[n] for n in self.adapter_names()}
        model.merged_rounds = set()  # (round index, adapter) of the updates already folded into its frozen weights

    def round_update(self, adapter: Adapter, factors: list[tuple[torch.Tensor, torch.Tensor]],
                     sizes: list[int]) -> tuple[FactoredUpdate, MergeRecord]:
        """The update to merge in factored form, from the clients' trained factors truncated to their ranks
        (a_c (..., in, r_c), b_c (..., r_c, out)) and data sizes; plus what to record."""
        raise NotImplementedError

    def base_update(self, adapter: Adapter, factors: FactoredUpdate, lead: torch.Size) -> torch.Tensor:
        """The update (..., in, out) to add to the frozen matrix, from ``round_update``'s factors; ``lead``:
        the adapter's leading dimensions (the expert axis of stacked FFN weights, or none)."""
        raise NotImplementedError

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        if not updates:
            return state
        params = self.average_others(state, updates)
        sizes = [u.client.num_examples for u in updates]
        merged, last = {}, {}
        for adapter in self.adapters:
            factors = [self.trained_factors(state, u, adapter) for u in updates]
            merged[adapter.a], last[adapter.a] = self.round_update(adapter, factors, sizes)
            params[adapter.a], params[adapter.b] = self.fresh[adapter.a], self.fresh[adapter.b]
        return ServerState(params, MergingState(state.method.rounds + [merged], last))

    def frozen_state(self, state: ServerState) -> MergedRounds:
        return MergedRounds(state.method.rounds)

    def sync_frozen(self, model: MoEModel, frozen: MergedRounds) -> None:
        params = dict(model.named_parameters())
        for adapter in self.adapters:  # one adapter's rounds in order; adapters touch different matrices
            for index, merged in enumerate(frozen.rounds):
                if adapter.a not in merged or (index, adapter.a) in model.merged_rounds:
                    continue
                lead = params[adapter.a].shape[:-2]
                merge_into_base(model, adapter, self.base_update(adapter, merged[adapter.a], lead))
                model.merged_rounds.add((index, adapter.a))

    def round_report(self, state: ServerState) -> dict:
        return {"merged": {adapter: {"broadcast_rank": r.broadcast_rank} | ({"ranks": r.ranks} if r.ranks else {})
                           for adapter, r in state.method.last.items()}}
