"""Sparse MoE with auxiliary-loss-free balancing: a per-expert selection bias (Wang et al. 2024).

Each layer keeps a bias b (E,) added to the router scores for the top-K selection only (the gate
probabilities stay those of the raw scores). After every local step the client moves it towards
balance, b_i <- b_i + u * sign(mean load - load_i), with the loads counted on the step's batch. The
bias travels with the trainable state and is averaged by data size. Tier model: the global one
(with the global bias) at the tier's K_c.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ubsmoe.config import option
from ubsmoe.methods.base import ClientSettings, register
from ubsmoe.methods.smoe import SparseMoE
from ubsmoe.model import MoEModel
from ubsmoe.model.moe_layer import MoEHook


@dataclass
class SMoEBiasOptions:
    bias_rate: float = option(1e-3, "u, the bias update rate per local step")


class SelectionBias(MoEHook):
    """Adds the layer's ``selection_bias`` (E,) to the selection scores, not to the probability logits."""

    def modulate(self, layer, select: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return select + layer.selection_bias, logits


def bias_step(bias: torch.Tensor, experts: torch.Tensor, rate: float) -> torch.Tensor:
    """b + rate * sign(mean load - load), loads counted from experts (T, K)."""
    load = torch.bincount(experts.reshape(-1), minlength=bias.shape[0]).to(bias.dtype)
    return bias + rate * torch.sign(load.mean() - load)


@register
class SMoEBias(SparseMoE):
    name = "smoe-bias"
    description = "sparse MoE with auxiliary-loss-free balancing (per-expert selection bias)"
    details = ('sparse MoE + auxiliary-loss-free selection bias, b_i += u·sign(mean load − load_i) (`bias_rate` '
               '1e-3)')
    tier_model = 'global model and bias at K_c'
    Options = SMoEBiasOptions

    def prepare_model(self, model: MoEModel) -> None:
        super().prepare_model(model)
        for layer in model.moe_layers:
            model.share_buffer(layer, "selection_bias", torch.zeros(layer.num_experts))

    def client_hooks(self, model: MoEModel, settings: ClientSettings) -> list[MoEHook]:
        return [SelectionBias()]

    def after_backward(self, model: MoEModel) -> None:
        for layer in model.moe_layers:
            if layer.last_routing is not None:
                layer.selection_bias.copy_(bias_step(layer.selection_bias, layer.last_routing.experts,
                                                     self.options.bias_rate))
