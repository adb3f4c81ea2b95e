"""A3SMoE (after FLAME, Tran et al. 2025): activation-aware expert aggregation and output rescaling.

Aggregation: expert i's LoRA update from client c is weighted by w_ci proportional to
(a_ci / n_c)^t * |D_c| (a_ci tokens the client routed to expert i in that layer, n_c tokens it saw),
normalised over the clients; t = 0 gives FedAvg. Every other tensor is averaged by data size.
Rescaling: a client with K_c < K_max multiplies each MoE layer's output by a learnable scalar (one per
layer and per K, starting at 1) that makes up for the experts it leaves out; the scalars of a K are
averaged over the clients of that K. Tier model: the global one at the tier's K_c, with its scalars.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ubsmoe.config import ConfigError, option
from ubsmoe.methods.base import (
    ClientInfo, ClientSettings, ClientUpdate, Params, ServerState, register, weighted_delta_average,
)
from ubsmoe.methods.records import MethodRecord
from ubsmoe.methods.smoe import SparseMoE
from ubsmoe.model import MoEModel
from ubsmoe.model.moe_layer import MoEHook


@dataclass
class A3SMoEOptions:
    temperature: float = option(1.0, "t: expert updates weighted by (activation share)^t * data size; 0 = FedAvg")
    rescale: bool = option(True, "learnable output rescaling for clients with K_c < K_max")

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"method.temperature must be >= 0, got {self.temperature}")


class OutputRescaling(MoEHook):
    """Multiplies the layer's combined expert output by its ``output_scale`` parameter."""

    def adjust_output(self, layer, output: torch.Tensor, record) -> torch.Tensor:
        return output * layer.output_scale


def activation_weights(routed: torch.Tensor, tokens: torch.Tensor, sizes: torch.Tensor, t: float) -> torch.Tensor:
    """Per-expert client weights. routed: (C, L, E); tokens: (C, L); sizes: (C,) -> (C, L, E), summing
    to 1 over clients; where no client activated an expert, the data-size weights."""
    share = routed / tokens.clamp_min(1).unsqueeze(2)
    raw = share.pow(t) * sizes.view(-1, 1, 1) if t != 0 else sizes.view(-1, 1, 1).expand_as(share).clone()
    total = raw.sum(0, keepdim=True)
    fedavg = (sizes / sizes.sum()).view(-1, 1, 1).expand_as(raw)
    return torch.where(total > 0, raw / total.clamp_min(1e-300), fedavg)


@dataclass
class KScales(MethodRecord):
    """A3SMoE's server state: for the clients of each K_c < K_max, every layer's output scalar (by the
    scale parameter's name), averaged over those clients; a K without an entry has not trained yet."""

    scales: dict[int, Params] = field(default_factory=dict)


@register
class A3SMoE(SparseMoE):
    name = "a3smoe"
    description = "A3SMoE: activation-aware expert aggregation and output rescaling for low-K clients"
    details = ('activation-aware expert aggregation, weights ∝ (a_ci/n_c)^t·\\|D_c\\| (`temperature` 1), learnable'
               ' output rescaling per layer and K for K_c < K_max')
    tier_model = "global model at K_c with that K's scalars"
    Options = A3SMoEOptions
    State = KScales

    def prepare_model(self, model: MoEModel) -> None:
        super().prepare_model(model)
        self.expert_names = model.expert_tensors()
        self.scale_names = []
        if self.options.rescale:
            for layer in model.moe_layers:
                layer.register_parameter("output_scale", nn.Parameter(torch.ones(())))
            self.scale_names = [model.state_name(layer.output_scale) for layer in model.moe_layers]

    def _rescaled(self, k: int) -> bool:
        return self.options.rescale and k < self.k_max

    def scales(self, state: ServerState, k: int) -> list[torch.Tensor] | None:
        """The per-layer scalars of the clients of K = k, or None before any client of that K was aggregated."""
        of_k = state.method.scales.get(k)
        return [of_k[n] for n in self.scale_names] if self.scale_names and of_k else None

    def _with_scales(self, state: ServerState, k: int) -> Params:
        scales = self.scales(state, k)
        if not self.scale_names or scales is None:
            return state.params
        return state.params | dict(zip(self.scale_names, scales))

    def client_params(self, state: ServerState, client: ClientInfo) -> Params:
        return self._with_scales(state, self.top_k(client.budget))

    def eval_params(self, state: ServerState, budget: float) -> Params:
        return self._with_scales(state, self.top_k(budget))

    def client_hooks(self, model: MoEModel, settings: ClientSettings) -> list[MoEHook]:
        return [OutputRescaling()] if self._rescaled(settings.top_k) else []

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        if not updates:
            return state
        sizes = torch.tensor([float(u.client.num_examples) for u in updates], dtype=torch.float64)
        routed = torch.stack([u.routing.routed for u in updates])
        tokens = torch.stack([u.routing.tokens for u in updates])
        weights = activation_weights(routed, tokens, sizes, self.options.temperature)  # (C, L, E)
        # FedAvg for the shared tensors; the per-K scalars live in the state's record and their global entries stay 1
        params = weighted_delta_average({n: v for n, v in state.params.items() if n not in self.expert_names
                                         and n not in self.scale_names}, updates)
        params |= {n: state.params[n] for n in self.scale_names}
        for name, layer_index in self.expert_names.items():
            value, w = state.params[name], weights[:, layer_index]  # w: (C, E)
            shape = (-1,) + (1,) * (value.dim() - 1)
            params[name] = value + sum(u.delta[name] * w[c].to(value.dtype).view(shape) for c, u in enumerate(updates))
        scales = dict(state.method.scales)
        by_k: dict[int, list[ClientUpdate]] = {}
        for u in updates:
            by_k.setdefault(self.top_k(u.client.budget), []).append(u)
        for k, group in by_k.items():
            if self._rescaled(k):
                start = self._with_scales(state, k)
                averaged = weighted_delta_average({n: start[n] for n in self.scale_names}, group)
                scales[k] = {n: averaged[n] for n in self.scale_names}
        return replace(state, params=params, method=KScales(scales))
