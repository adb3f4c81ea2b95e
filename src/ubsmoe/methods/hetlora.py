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

from dataclasses import dataclass, replace

import torch

from ubsmoe.config import ConfigError, option
from ubsmoe.methods.base import ClientInfo, ClientUpdate, Params, ServerState, register
from ubsmoe.methods.low_rank import HeterogeneousRankMethod, truncated
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


@register
class HetLoRA(HeterogeneousRankMethod):
    name = "hetlora"
    description = "HetLoRA: zero-padded heterogeneous ranks, norm-weighted aggregation, rank self-pruning"
    Options = HetLoRAOptions

    def __init__(self, options: HetLoRAOptions, k_max: int):
        super().__init__(options, k_max)
        self.ranks: dict[int, int] = {}  # client id -> its current (possibly self-pruned) rank
        self._tail_start: dict[int, float] = {}  # client id -> tail norm when its local training began

    def client_rank(self, client: ClientInfo) -> int:
        return self.ranks.get(client.client_id, super().client_rank(client))

    def _tail(self, rank: int) -> int:
        return int(self.options.prune_gamma * rank)

    def _tail_norms(self, model: MoEModel, rank: int) -> torch.Tensor:
        params = dict(model.named_parameters())
        start = self._tail(rank)
        return sum(tail_norm(params[ad.a], params[ad.b], start, rank) for ad in self.adapters)

    def setup_client(self, model: MoEModel, client: ClientInfo) -> None:
        super().setup_client(model, client)
        if client.client_id >= 0 and self.options.prune_lambda > 0:
            with torch.no_grad():
                self._tail_start[client.client_id] = float(self._tail_norms(model, self.client_rank(client)))

    def local_loss(self, model: MoEModel, client: ClientInfo) -> torch.Tensor | None:
        if self.options.prune_lambda <= 0:
            return None
        return self.options.prune_lambda * self._tail_norms(model, self.client_rank(client))

    def client_update(self, model, start: Params, client: ClientInfo, routing) -> ClientUpdate:
        update = super().client_update(model, start, client, routing)
        rank = self.client_rank(client)
        update.extra["rank"] = rank
        if self.options.prune_lambda > 0 and client.client_id in self._tail_start:
            with torch.no_grad():
                after = float(self._tail_norms(model, rank))
            update.extra["next_rank"] = next_rank(rank, self.options.prune_gamma,
                                                  self._tail_start.pop(client.client_id), after)
        return update

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        if not updates:
            return state
        params = self.average_others(state, updates)
        for adapter in self.adapters:
            padded, weights = [], []
            for u in updates:
                trained = {n: state.params[n] + u.delta[n] for n in (adapter.a, adapter.b)}
                a, b = truncated(trained, adapter, u.extra["rank"])
                padded.append((a, b))
                weights.append(adapter.scale * float(product_norm(a, b)))
            total = sum(weights)
            if total == 0:  # nothing trained this adapter: keep the global one
                params[adapter.a], params[adapter.b] = state.params[adapter.a], state.params[adapter.b]
                continue
            params[adapter.a] = sum(w / total * a for w, (a, _) in zip(weights, padded))
            params[adapter.b] = sum(w / total * b for w, (_, b) in zip(weights, padded))
        for u in updates:
            if "next_rank" in u.extra:
                self.ranks[u.client.client_id] = u.extra["next_rank"]
        return replace(state, params=params, extra={"client_ranks": dict(self.ranks)})

    def round_report(self, state: ServerState) -> dict:
        return {"client_ranks": {str(c): r for c, r in sorted(state.extra.get("client_ranks", {}).items())}}
