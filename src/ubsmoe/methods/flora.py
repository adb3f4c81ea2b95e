"""FLoRA (Wang et al. 2024): exact aggregation of heterogeneous-rank adapters by stacking.

Client c trains fresh rank-r_c adapters (a_c (in, r_c), b_c (r_c, out)); the server stacks
    A = [p_1 a_1, ..., p_C a_C]  (in, sum r_c),   B = [b_1; ...; b_C]  (sum r_c, out),   p_c = n_c / N,
so that scale * A B = sum_c p_c scale a_c b_c exactly (no cross terms, unlike averaging a and b
separately), and every client merges scale * A B into its frozen base before starting fresh adapters.
The task head is averaged by data size.

Tier model: the merged base with fresh adapters (the same for every tier).
"""

from __future__ import annotations

import torch

from ubsmoe.methods.base import register
from ubsmoe.methods.low_rank import Adapter, FactoredUpdate, MergeRecord, MergingMethod


def stack_factors(factors: list[tuple[torch.Tensor, torch.Tensor]], sizes: list[int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (..., in, R), B (..., R, out)), R = sum r_c, with A B = sum_c (n_c / N) a_c b_c."""
    total = sum(sizes)
    stacked_a = torch.cat([a * (n / total) for (a, _), n in zip(factors, sizes)], dim=-1)
    stacked_b = torch.cat([b for _, b in factors], dim=-2)
    return stacked_a, stacked_b


@register
class FLoRA(MergingMethod):
    name = "flora"
    description = "FLoRA: exact stacking of heterogeneous-rank adapters, merged into the base each round"
    details = 'dense model, rank r_c; exact stacking Σ p_c B_c A_c merged into the base, fresh adapters each round'
    tier_model = 'the merged model (same for every tier)'

    def round_update(self, adapter: Adapter, factors, sizes) -> tuple[FactoredUpdate, MergeRecord]:
        stacked_a, stacked_b = stack_factors(factors, sizes)
        return FactoredUpdate([stacked_a], [stacked_b]), MergeRecord(stacked_a.shape[-1])

    def base_update(self, adapter: Adapter, factors: FactoredUpdate, lead) -> torch.Tensor:
        return adapter.scale * (factors.a[0] @ factors.b[0])
