"""FLoRIST (Ramesh and Dass 2025): stacked adapters, SVD in the small space, singular value thresholding.

The server stacks the clients' adapters as FLoRA does (A (in, R), B (R, out), A B = sum_c p_c a_c b_c),
then decomposes without forming the full update: A = U_a S_a V_a^T, B = U_b S_b V_b^T, the R x R core
C = S_a V_a^T U_b S_b = U_c S_c V_c^T, so A B = (U_a U_c) S_c (V_c^T V_b^T). It keeps the smallest rank
r whose singular values hold at least tau of the energy (sum_{i<=r} s_i^2 >= tau sum_i s_i^2) and
forms one global pair (U_a U_c[:, :r] S_c[:r], V_c[:, :r]^T V_b^T) for all clients, which every client
merges into its frozen base before training fresh rank-r_c adapters. The task head is averaged by data size.

Tier model: the merged base with fresh adapters (the same for every tier).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ubsmoe.config import ConfigError, option
from ubsmoe.methods.base import register
from ubsmoe.methods.flora import stack_factors
from ubsmoe.methods.low_rank import Adapter, FactoredUpdate, MergeRecord, MergingMethod


@dataclass
class FLoRISTOptions:
    tau: float = option(0.9, "energy threshold: keep the fewest singular values holding this share of the energy")

    def __post_init__(self) -> None:
        if not 0 < self.tau <= 1:
            raise ConfigError(f"method.tau must be in (0, 1], got {self.tau}")


def energy_rank(singular_values: torch.Tensor, tau: float) -> int:
    """The smallest r with sum_{i<r} s_i^2 >= tau * sum_i s_i^2 (s sorted descending, 1-D)."""
    energy = singular_values.square()
    total = float(energy.sum())
    if total == 0:
        return 1
    cumulative = energy.cumsum(0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(tau - 1e-12, dtype=cumulative.dtype))) + 1


def thresholded_pair(stacked_a: torch.Tensor, stacked_b: torch.Tensor, tau: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(global a (in, r), global b (r, out), the core's singular values (R,)) for 2-D stacked factors."""
    u_a, s_a, vh_a = torch.linalg.svd(stacked_a, full_matrices=False)
    u_b, s_b, vh_b = torch.linalg.svd(stacked_b, full_matrices=False)
    core = (s_a[:, None] * vh_a) @ (u_b * s_b[None, :])
    u_c, s_c, vh_c = torch.linalg.svd(core, full_matrices=False)
    rank = energy_rank(s_c, tau)
    return (u_a @ u_c[:, :rank]) * s_c[:rank], vh_c[:rank] @ vh_b, s_c


@register
class FLoRIST(MergingMethod):
    name = "florist"
    description = "FLoRIST: SVD of stacked adapters, energy-thresholded global low-rank pair merged each round"
    details = 'as `flora`, but SVD of the stacked factors and one global pair keeping energy ≥ τ (`tau` 0.9)'
    tier_model = 'the merged model (same for every tier)'
    Options = FLoRISTOptions

    def round_update(self, adapter: Adapter, factors, sizes) -> tuple[FactoredUpdate, MergeRecord]:
        """One global pair per matrix (per expert for stacked FFN weights), each at its energy rank."""
        stacked_a, stacked_b = stack_factors(factors, sizes)
        flat_a = stacked_a.reshape(-1, *stacked_a.shape[-2:])
        flat_b = stacked_b.reshape(-1, *stacked_b.shape[-2:])
        pairs = FactoredUpdate([], [])
        for a, b in zip(flat_a, flat_b):
            global_a, global_b, _ = thresholded_pair(a, b, self.options.tau)
            pairs.a.append(global_a)
            pairs.b.append(global_b)
        ranks = [a.shape[-1] for a in pairs.a]
        return pairs, MergeRecord(max(ranks), ranks)

    def base_update(self, adapter: Adapter, factors: FactoredUpdate, lead) -> torch.Tensor:
        updates = [a @ b for a, b in zip(factors.a, factors.b)]
        return adapter.scale * torch.stack(updates).reshape(*lead, *updates[0].shape)
