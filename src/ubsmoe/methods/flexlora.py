"""FlexLoRA (Bai et al. 2024): average full-size updates, redistribute by SVD at each client's rank.

The server keeps, per adapter, the global update dW = sum_c (n_c / N) scale a_c b_c (full size).
Client c starts from the best rank-r_c factors of dW (truncated SVD: a = U_r, b = S_r V_r^T / scale);
before any aggregation it starts from the initial adapters truncated to r_c. The task head is
averaged by data size.

Tier model: the truncated SVD of dW at the tier's r_c.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ubsmoe.methods.base import ClientInfo, ClientUpdate, Params, ServerState, register
from ubsmoe.methods.low_rank import HeterogeneousRankMethod, factors_from_svd


def weighted_product_average(products: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """sum_c (n_c / N) product_c."""
    total = sum(sizes)
    return sum(p * (n / total) for p, n in zip(products, sizes))


@register
class FlexLoRA(HeterogeneousRankMethod):
    name = "flexlora"
    description = "FlexLoRA: full-size weighted update average, SVD redistribution at each client's rank"

    def _params_at_rank(self, state: ServerState, rank: int) -> Params:
        decompositions = state.extra.get("svd")
        if decompositions is None:
            return state.params
        params = dict(state.params)
        for adapter in self.adapters:
            params[adapter.a], params[adapter.b] = factors_from_svd(decompositions[adapter.a], rank, self.r_max,
                                                                    adapter.scale)
        return params

    def client_params(self, state: ServerState, client: ClientInfo) -> Params:
        return self._params_at_rank(state, self.client_rank(client))

    def eval_params(self, state: ServerState, budget: float) -> Params:
        return self._params_at_rank(state, self.eval_key(budget))

    def client_update(self, model, start: Params, client: ClientInfo, routing) -> ClientUpdate:
        update = super().client_update(model, start, client, routing)
        trained = model.trainable_state()
        rank = self.client_rank(client)
        update.extra["products"] = {ad.a: ad.product(trained, rank) for ad in self.adapters}
        return update

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        if not updates:
            return state
        params = self.average_others(state, updates)
        for adapter in self.adapters:  # the factors are rebuilt from the updates for every client
            params[adapter.a], params[adapter.b] = state.params[adapter.a], state.params[adapter.b]
        sizes = [u.client.num_examples for u in updates]
        # one SVD per adapter and round; every client and tier takes its top ranks from it
        svd = {ad.a: torch.linalg.svd(weighted_product_average([u.extra["products"][ad.a] for u in updates], sizes),
                                      full_matrices=False) for ad in self.adapters}
        return replace(state, params=params, extra={"svd": svd})
