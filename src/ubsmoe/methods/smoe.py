"""Naive heterogeneous sparse MoE: client c activates its top-K_c experts, plain FedAvg, no balancing.

K_c = max(1, floor(K_max * beta_c)); a tier's model is the global one run at its K_c.
"""

from __future__ import annotations

from ubsmoe.methods.base import ClientInfo, FederatedMethod, register, top_k_for_budget
from ubsmoe.model import MoEClassifier


@register
class SparseMoE(FederatedMethod):
    name = "smoe"
    description = "heterogeneous sparse MoE: top-K_c experts per client, FedAvg, no balancing"

    def setup_client(self, model: MoEClassifier, client: ClientInfo) -> None:
        model.set_top_k(top_k_for_budget(self.k_max, client.budget))

    def eval_key(self, budget: float) -> int:
        return top_k_for_budget(self.k_max, budget)
