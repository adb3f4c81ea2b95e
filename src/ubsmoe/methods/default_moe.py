"""Default MoE (Panda et al. 2025): default outputs for inactive experts give the router a dense gradient.

Each layer keeps d_i (E, d), an exponential moving average of expert i's mean output over the tokens
routed to it (updated at every training forward, d_i <- beta d_i + (1 - beta) mean_i, for the experts
that received tokens). A default starts from the first mean it sees (``expert_defaults_seen``, which
travels with it), not from zero: an average started at zero is (1 - beta^n) of the true mean after n
updates, 23 % after 5 steps at beta = 0.95. In the forward sum an inactive expert contributes its default output with the
gate the layer uses (straight-through: value 1, gradient d/dp_i; softmax gates: p_i), so the router
receives a gradient for every expert while the inactive experts' weights receive none (d is constant
to autograd). The defaults travel with the trainable state. The server averages each expert's default
by data size over the clients that updated it (a client at K = M runs the dense path and updates none;
a weak client only those that received tokens), so a client that did not update a default does not pull
it back towards its old value; a default no client updated keeps its value.
Tier model: the global one at the tier's K_c, defaults included.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ubsmoe.config import ConfigError, option
from ubsmoe.methods.base import ClientInfo, ClientSettings, ClientUpdate, Params, RoutingStats, ServerState, register
from ubsmoe.methods.records import MethodRecord
from ubsmoe.methods.smoe import SparseMoE
from ubsmoe.model import MoEModel
from ubsmoe.model.expert_observation import ExpertComputation
from ubsmoe.model.moe_layer import MoEHook, RoutingRecord, SlotLayout, SparseMoEFFN


@dataclass
class DefaultMoEOptions:
    ema_decay: float = option(0.95, "beta, the decay of the moving average of each expert's mean output")

    def __post_init__(self) -> None:
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"method.ema_decay must be in [0, 1), got {self.ema_decay}")


def expert_mean_outputs(layer: SparseMoEFFN, layout: SlotLayout, activation: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean output (without b_down) of each expert over its slots: (E, d), and which experts had slots (E,).

    The down-projection is linear, so the mean output is the mean activation (E, h) times the expert's
    adapted down matrix: no per-token output is formed. activation: (S, h) ungated, slots sorted by expert.
    """
    E = layer.num_experts
    counts = torch.tensor(layout.counts, dtype=activation.dtype, device=activation.device)
    sums = activation.new_zeros(E, activation.shape[1]).index_add_(0, layout.expert, activation)
    means = (sums / counts.clamp_min(1).unsqueeze(1)).unsqueeze(1)  # (E, 1, h)
    low_rank = torch.bmm(torch.bmm(means, layer.lora_down_a), layer.lora_down_b) * layer.lora_scale  # through r
    w_down = layer.w_down  # in its own dtype: no float32 copy of a bf16 model's experts
    return (torch.bmm(means.to(w_down.dtype), w_down).to(means.dtype) + low_rank).squeeze(1), counts > 0


class DefaultOutputs(MoEHook):
    """Keeps each layer's ``expert_defaults`` up to date and adds them for the inactive experts."""

    def __init__(self, decay: float, update: bool):
        self.decay = decay
        self.update = update
        self.updated: dict[SparseMoEFFN, torch.Tensor] = {}  # layer -> (E,) bool: defaults this client moved

    def observe_experts(self, layer, layout: SlotLayout, seen: ExpertComputation) -> None:
        if not (self.update and layer.training):
            return
        with torch.no_grad():
            means, routed = expert_mean_outputs(layer, layout, seen.activation.detach())
            started = layer.expert_defaults_seen.bool().unsqueeze(1)
            blended = torch.where(started, self.decay * layer.expert_defaults + (1 - self.decay) * means, means)
            layer.expert_defaults.copy_(torch.where(routed.unsqueeze(1), blended, layer.expert_defaults))
            layer.expert_defaults_seen.copy_(layer.expert_defaults_seen.maximum(routed.to(layer.expert_defaults_seen.dtype)))
            self.updated[layer] = self.updated.get(layer, torch.zeros_like(routed)) | routed

    def adjust_output(self, layer, output: torch.Tensor, record: RoutingRecord) -> torch.Tensor:
        if layer.top_k == layer.num_experts:
            return output
        inactive = torch.ones_like(record.probs, dtype=torch.bool).scatter_(1, record.experts, False)
        probs = record.probs
        if layer.gate_mode == "straight_through":
            weights = probs - probs.detach() + 1.0
        elif layer.gate_mode == "softmax_renorm":
            weights = probs / probs.gather(1, record.experts).sum(1, keepdim=True)
        else:
            weights = probs
        weights = torch.where(inactive, weights, torch.zeros((), dtype=weights.dtype))
        return output + weights @ layer.expert_defaults.to(weights.dtype)


@dataclass
class UpdatedDefaults(MethodRecord):
    """What a Default MoE client uploads beside its deltas: (L, E) bool, which experts' defaults it moved."""

    defaults_updated: torch.Tensor


@register
class DefaultMoE(SparseMoE):
    name = "default-moe"
    description = "Default MoE: moving-average default outputs for inactive experts (dense router gradient)"
    details = ("moving averages of each expert's mean output stand in for inactive experts (`ema_decay` 0.95), "
               'each started from the first mean it sees (an average started at zero is 23 % of the mean after 5'
               ' steps at 0.95): dense router gradient; each average is aggregated over the clients that updated'
               ' it')
    tier_model = 'global model and defaults at K_c'
    Options = DefaultMoEOptions
    Extras = UpdatedDefaults

    def prepare_model(self, model: MoEModel) -> None:
        super().prepare_model(model)
        self.default_names = [model.share_buffer(layer, "expert_defaults", torch.zeros(layer.num_experts, layer.d_model))
                              for layer in model.moe_layers]
        # (E,) 1 once an expert's default holds a mean (it then blends), 0 before (its first mean is taken as is)
        self.seen_names = [model.share_buffer(layer, "expert_defaults_seen", torch.zeros(layer.num_experts))
                           for layer in model.moe_layers]

    def client_hooks(self, model: MoEModel, settings: ClientSettings) -> list[MoEHook]:
        return [DefaultOutputs(self.options.ema_decay, update=settings.training)]  # defaults learn in training

    def client_update(self, model: MoEModel, start: Params, client: ClientInfo, settings: ClientSettings,
                      routing: RoutingStats | None) -> ClientUpdate:
        """The deltas, and ``defaults_updated`` (L, E) bool: which experts' defaults this client moved."""
        update = super().client_update(model, start, client, settings, routing)
        (hook,) = [h for h in self.hooks if isinstance(h, DefaultOutputs)]
        update.extras = UpdatedDefaults(torch.stack(
            [hook.updated.get(layer, torch.zeros(layer.num_experts, dtype=torch.bool)).cpu() for layer in model.moe_layers]))
        return update

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        """FedAvg, except each expert's default: the data-weighted mean delta of the clients that updated it."""
        new = super().aggregate(state, updates)
        if not updates:
            return new
        params = dict(new.params)
        for index, name in enumerate(self.default_names):
            weights = torch.stack([u.extras.defaults_updated[index].to(state.params[name].dtype) * u.client.num_examples
                                   for u in updates])  # (C, E)
            total = weights.sum(0)
            step = sum(w.unsqueeze(1) * u.delta[name] for w, u in zip(weights, updates))
            params[name] = state.params[name] + step / total.clamp_min(1).unsqueeze(1)
            seen = self.seen_names[index]
            params[seen] = state.params[seen].maximum((total > 0).to(state.params[seen].dtype))
        return replace(new, params=params)
