"""FlexLoRA (Bai et al. 2024): average full-size updates, redistribute by SVD at each client's rank.

Clients upload their trained factors at their rank; the server keeps, per adapter, the global update
dW = sum_c (n_c / N) scale a_c b_c (full size).
Client c starts from the best rank-r_c factors of dW (truncated SVD: a = U_r, b = S_r V_r^T / scale);
before any aggregation it starts from the initial adapters truncated to r_c. The task head is
averaged by data size.

Tier model: the truncated SVD of dW at the tier's r_c.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ubsmoe.methods.base import ClientInfo, ClientSettings, ClientUpdate, Params, ServerState, register
from ubsmoe.methods.records import MethodRecord
from ubsmoe.methods.low_rank import HeterogeneousRankMethod, factors_from_svd, prefix


def weighted_product_average(products: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """sum_c (n_c / N) product_c."""
    total = sum(sizes)
    return sum(p * (n / total) for p, n in zip(products, sizes))


@dataclass
class SVDFactors(MethodRecord):
    """The SVD of an adapter's aggregated update ΔW (..., in, out): u (..., in, R), s (..., R), vh (..., R, out)."""

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor


@dataclass
class GlobalSVD(MethodRecord):
    """FlexLoRA's server state: each adapter's (by its a factor's name) SVD of the last aggregated update;
    empty before the first aggregation."""

    svd: dict[str, SVDFactors] = field(default_factory=dict)


@dataclass
class TrainedFactors(MethodRecord):
    """What a FlexLoRA client uploads for its adapters: the trained factors at its rank, by name."""

    factors: Params = field(default_factory=dict)

    def trained(self) -> Params:
        return self.factors


@register
class FlexLoRA(HeterogeneousRankMethod):
    name = "flexlora"
    description = "FlexLoRA: full-size weighted update average, SVD redistribution at each client's rank"
    details = 'dense model, rank r_c; weighted average of full-size updates, SVD, top-r_c redistribution'
    tier_model = 'truncated SVD of the global update at r_c'
    State, Extras = GlobalSVD, TrainedFactors

    def _params_at_rank(self, state: ServerState, rank: int) -> Params:
        if not state.method.svd:  # before any aggregation: the initial adapters
            return state.params
        params = dict(state.params)
        for adapter in self.adapters:
            svd = state.method.svd[adapter.a]
            params[adapter.a], params[adapter.b] = factors_from_svd((svd.u, svd.s, svd.vh), rank, self.r_max,
                                                                    adapter.scale)
        return params

    def full_client_params(self, state: ServerState, client: ClientInfo) -> Params:
        return self._params_at_rank(state, self.client_settings(state, client).rank)

    def eval_params(self, state: ServerState, budget: float) -> Params:
        rank = self.eval_settings(state, budget).rank
        return self.at_rank(self._params_at_rank(state, rank), rank)

    def client_update(self, model, start: Params, client: ClientInfo, settings: ClientSettings,
                      routing) -> ClientUpdate:
        """FlexLoRA's clients upload their trained factors at their rank (``TrainedFactors``), from which the
        server forms the products, and the deltas of every other tensor."""
        update = super().client_update(model, start, client, settings, routing)
        trained = model.trainable_state()
        factors = {}
        for name, factor in self.factor_of.items():
            del update.delta[name]
            factors[name] = prefix(trained[name], factor, settings.rank)
        update.extras = TrainedFactors(factors)
        return update

    def trained_factors(self, state: ServerState, update: ClientUpdate, adapter) -> tuple[torch.Tensor, torch.Tensor]:
        return update.extras.factors[adapter.a], update.extras.factors[adapter.b]

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        if not updates:
            return state
        params = self.average_others(state, updates)
        for adapter in self.adapters:  # the factors are rebuilt from the updates for every client
            params[adapter.a], params[adapter.b] = state.params[adapter.a], state.params[adapter.b]
        sizes = [u.client.num_examples for u in updates]
        # one SVD per adapter and round; every client and tier takes its top ranks from it
        svd = {}
        for ad in self.adapters:
            products = []
            for u in updates:
                a, b = self.trained_factors(state, u, ad)
                products.append(ad.scale * (a @ b))
            svd[ad.a] = SVDFactors(*torch.linalg.svd(weighted_product_average(products, sizes), full_matrices=False))
        return ServerState(params, GlobalSVD(svd))
