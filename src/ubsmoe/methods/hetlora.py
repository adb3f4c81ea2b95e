"""HetLoRA (Cho et al. 2024): heterogeneous LoRA ranks by zero-padding and truncation.

Client c receives the first r_c ranks of the global adapters (truncation) and trains them with a local
rank self-pruning regulariser on its tail ranks, lambda * ||a[:, p:r_c] b[p:r_c, :]||_F with
p = floor(gamma r_c); when the tail's norm shrank during local training, the client prunes its rank to
max(1, p) for the following rounds. The server zero-pads every client's factors to r_max and averages
them per adapter with weights proportional to ||scale a_c b_c||_F (sparsity-weighted aggregation);
the task head is averaged by data size.

Tier model: the global adapters truncated to the tier's r_c.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ubsmoe.config import ConfigError, option
from ubsmoe.methods.base import ClientInfo, ClientSettings, ClientUpdate, Params, ServerState, register
from ubsmoe.methods.records import MethodRecord
from ubsmoe.methods.low_rank import HeterogeneousRankMethod, zero_padded
from ubsmoe.model import MoEModel


@dataclass
class HetLoRAOptions:
    prune_lambda: float = option(1e-3, "weight of the rank self-pruning regulariser (0 turns self-pruning off)")
    prune_gamma: float = option(0.99, "rank decay factor gamma: the tail is ranks floor(gamma r) .. r")

    def __post_init__(self) -> None:
        if not 0 < self.prune_gamma <= 1:
            raise ConfigError(f"method.prune_gamma must be in (0, 1], got {self.prune_gamma}")
        if self.prune_lambda < 0:
            raise ConfigError(f"method.prune_lambda must be >= 0, got {self.prune_lambda}")


def product_norm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a @ b||_F for a (..., in, r), b (..., r, out), summed over leading dimensions, without forming
    the product: ||A B||_F^2 = sum((A^T A) * (B B^T))."""
    gram = (a.transpose(-1, -2) @ a) * (b @ b.transpose(-1, -2))
    return (gram.sum((-1, -2)).clamp_min(0) + 1e-12).sqrt().sum()


def tail_norm(a: torch.Tensor, b: torch.Tensor, start: int, rank: int) -> torch.Tensor:
    """||a[..., start:rank] @ b[..., start:rank, :]||_F summed over leading dimensions."""
    return product_norm(a[..., start:rank], b[..., start:rank, :])


def next_rank(rank: int, gamma: float, tail_before: float, tail_after: float) -> int:
    """Self-pruning: max(1, floor(gamma rank)) when local training shrank the tail's norm, else rank."""
    return max(1, int(gamma * rank)) if tail_after < tail_before else rank


@dataclass
class PrunedRanks(MethodRecord):
    """HetLoRA's server state: the rank each client pruned itself to (client id -> rank; absent: its tier's)."""

    ranks: dict[int, int] = field(default_factory=dict)


@dataclass
class NextRank(MethodRecord):
    """What a HetLoRA client uploads beside its deltas: the rank it prunes itself to (None: pruning is off)."""

    next_rank: int | None = None


@register
class HetLoRA(HeterogeneousRankMethod):
    name = "hetlora"
    description = "HetLoRA: zero-padded heterogeneous ranks, norm-weighted aggregation, rank self-pruning"
    details = ('dense model, rank r_c; zero-padding, aggregation weighted by ‖ΔW_c‖_F, truncation, rank '
               'self-pruning (`prune_lambda` 1e-3, `prune_gamma` 0.99; at these defaults it never fires: γ = '
               '0.99 leaves a one-rank tail that the next local round grows back)')
    tier_model = 'global adapters truncated to r_c'
    Options = HetLoRAOptions
    State, Extras = PrunedRanks, NextRank

    def client_settings(self, state: ServerState, client: ClientInfo) -> ClientSettings:
        """The client's current rank: its tier's, or the one it pruned itself to."""
        tier = self.tier_settings(client.budget)
        return replace(tier, rank=state.method.ranks.get(client.client_id, tier.rank))

    def _tail(self, rank: int) -> int:
        return int(self.options.prune_gamma * rank)

    def _tail_norms(self, model: MoEModel, rank: int) -> torch.Tensor:
        params = dict(model.named_parameters())
        start = self._tail(rank)
        return sum(tail_norm(params[ad.a], params[ad.b], start, rank) for ad in self.adapters)

    def setup_client(self, model: MoEModel, settings: ClientSettings) -> None:
        super().setup_client(model, settings)
        self._tail_start = None  # the tail norm when local training began
        if settings.training and self.options.prune_lambda > 0:
            with torch.no_grad():
                self._tail_start = float(self._tail_norms(model, settings.rank))

    def local_loss(self, model: MoEModel) -> torch.Tensor | None:
        if self.options.prune_lambda <= 0:
            return None
        return self.options.prune_lambda * self._tail_norms(model, self.rank)

    def client_update(self, model, start: Params, client: ClientInfo, settings: ClientSettings,
                      routing) -> ClientUpdate:
        """The deltas at the client's rank, and ``next_rank``: the rank it prunes itself to."""
        update = super().client_update(model, start, client, settings, routing)
        update.extras = NextRank()
        if self._tail_start is not None:
            with torch.no_grad():
                after = float(self._tail_norms(model, settings.rank))
            update.extras.next_rank = next_rank(settings.rank, self.options.prune_gamma, self._tail_start, after)
        return update

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        if not updates:
            return state
        params = self.average_others(state, updates)
        for adapter in self.adapters:
            padded, weights = [], []
            for u in updates:
                a, b = self.trained_factors(state, u, adapter)
                a, b = zero_padded(a, state.params[adapter.a].shape), zero_padded(b, state.params[adapter.b].shape)
                padded.append((a, b))
                weights.append(adapter.scale * float(product_norm(a, b)))
            total = sum(weights)
            if total == 0:  # nothing trained this adapter: keep the global one
                params[adapter.a], params[adapter.b] = state.params[adapter.a], state.params[adapter.b]
                continue
            params[adapter.a] = sum(w / total * a for w, (a, _) in zip(weights, padded))
            params[adapter.b] = sum(w / total * b for w, (_, b) in zip(weights, padded))
        ranks = dict(state.method.ranks)
        for u in updates:
            if u.extras.next_rank is not None:  # a rank only shrinks, and stays >= 1
                current = self.client_settings(state, u.client).rank
                ranks[u.client.client_id] = max(1, min(u.extras.next_rank, current))
        return ServerState(params, PrunedRanks(ranks))

    def round_report(self, state: ServerState) -> dict:
        return {"client_ranks": {str(c): r for c, r in sorted(state.method.ranks.items())}}
