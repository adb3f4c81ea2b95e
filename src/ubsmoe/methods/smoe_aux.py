"""Sparse MoE with the Switch auxiliary load-balancing loss ("SMoE-LLB").

Each local step adds, per MoE layer, coef * M * sum_i f_i P_i, where f_i is the share of the layer's
routed (token, expert) slots that went to expert i (sum_i f_i = 1) and P_i the mean router probability
of expert i over the batch's tokens; the loss is averaged over layers. Otherwise ``smoe``: top-K_c per
client, FedAvg. Tier model: the global one at the tier's K_c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ubsmoe.config import option
from ubsmoe.methods.base import register
from ubsmoe.methods.smoe import SparseMoE
from ubsmoe.model import MoEModel
from ubsmoe.model.moe_layer import RoutingRecord


@dataclass
class SMoEAuxOptions:
    aux_coef: float = option(0.01, "coefficient of the auxiliary load-balancing loss")


def switch_balance_loss(record: RoutingRecord, num_experts: int) -> torch.Tensor:
    """M * sum_i f_i P_i for one layer's routing (differentiable through the probabilities)."""
    counts = torch.bincount(record.experts.reshape(-1), minlength=num_experts).to(record.probs.dtype)
    fraction = counts / counts.sum()
    return num_experts * (fraction * record.probs.mean(0)).sum()


@register
class SMoEAux(SparseMoE):
    name = "smoe-aux"
    description = "sparse MoE with the Switch auxiliary load-balancing loss"
    details = 'sparse MoE + Switch auxiliary load-balancing loss (`aux_coef` 0.01)'
    tier_model = 'global model at K_c'
    Options = SMoEAuxOptions

    def local_loss(self, model: MoEModel) -> torch.Tensor | None:
        records = [layer.last_routing for layer in model.moe_layers if layer.last_routing is not None]
        if not records or self.options.aux_coef == 0:
            return None
        losses = [switch_balance_loss(r, model.num_experts) for r in records]
        return self.options.aux_coef * torch.stack(losses).mean()
