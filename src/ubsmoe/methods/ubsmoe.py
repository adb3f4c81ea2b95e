"""UB-SMoE: Dynamic Modulated Routing (DMR) plus the Universal Pseudo-Gradient (PG), on top of sparse MoE.

Each client activates its top-K_c experts by modulated logits m = s + phi (phi added inside the top-N_p
candidates), trains phi with a range regulariser, and adds pseudo-gradients for the experts it did
not activate. The server averages everything by data size, then pulls each layer's phi towards a
utilisation target:
    u_i = sum_c p_c a_ci / n_c,  u* = K_bar / M,  phi_target_i = tanh(u* / (u_i + eps) - 1),
    phi <- zeta * phi_bar + (1 - zeta) * phi_target.
Switches ``dmr``, ``pg`` and ``phi_range`` give the ablations.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ubsmoe.config import ConfigError, option
from ubsmoe.methods.base import ClientSettings, ClientUpdate, ServerState, register
from ubsmoe.methods.records import MethodRecord
from ubsmoe.methods.smoe import SparseMoE
from ubsmoe.model import MoEModel
from ubsmoe.model.moe_layer import MoEHook
from ubsmoe.model.modulated_routing import ModulatedRouting, attach_phi, range_penalty
from ubsmoe.model.pseudo_gradient import RHO_RULES, PseudoGradient, sparsity_factor


@dataclass
class UBSMoEOptions:
    dmr: bool = option(True, "Dynamic Modulated Routing on/off")
    pg: bool = option(True, "Universal Pseudo-Gradient on/off")
    phi_range: bool = option(True, "keep phi in [phi_min, phi_max] by a penalty on its excess (the range regulariser)")
    candidates: int = option(0, "N_p, the candidate-set size (K_max <= N_p <= M); 0 means min(M, 2 K_max)")
    zeta: float = option(0.5, "blend: phi = zeta * (clients' mean phi) + (1 - zeta) * utilisation target")
    phi_range_weight: float = option(1e-2, "lambda, the weight of the range regulariser")
    eps: float = option(1e-6, "epsilon in the utilisation target")
    phi_min: float = option(-1.0, "lower end of phi's allowed range")
    phi_max: float = option(1.0, "upper end of phi's allowed range")
    rho: str = option("1-k/m", "pseudo-gradient scale rho_c: 1-k/m, m/k or kmax/k")

    def __post_init__(self) -> None:
        if self.rho not in RHO_RULES:
            raise ConfigError(f"method.rho must be one of {', '.join(RHO_RULES)}, got {self.rho!r}")
        if not 0 <= self.zeta <= 1:
            raise ConfigError(f"method.zeta must be in [0, 1], got {self.zeta}")
        if self.phi_min > self.phi_max:
            raise ConfigError("method.phi_min must not exceed method.phi_max")


def utilisation_target(routed: torch.Tensor, tokens: torch.Tensor, top_k: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Global utilisation and the modulation target from the clients' uploads.

    routed: (C, L, E) tokens each client routed to each expert; tokens: (C, L) tokens each client saw;
    top_k: (C,) the clients' K_c. Returns (u (L, E), phi_target (L, E)).
    """
    weights = tokens / tokens.sum(0, keepdim=True)  # p_c per layer: (C, L)
    usage = (weights.unsqueeze(2) * routed / tokens.clamp_min(1).unsqueeze(2)).sum(0)  # (L, E)
    k_bar = (weights * top_k.unsqueeze(1)).sum(0)  # (L,)
    target_usage = (k_bar / routed.shape[2]).unsqueeze(1)  # u* = K_bar / M
    return usage, torch.tanh(target_usage / (usage + eps) - 1)


@dataclass
class Utilisation(MethodRecord):
    """UB-SMoE's server state beside φ (which is a global tensor): the last round's global utilisation u
    (L, E) and modulation target φ~ (L, E); None before the first aggregation or without DMR."""

    usage: torch.Tensor | None = None
    phi_target: torch.Tensor | None = None


@register
class UBSMoE(SparseMoE):
    name = "ubsmoe"
    description = "UB-SMoE: sparse MoE with Dynamic Modulated Routing and the Universal Pseudo-Gradient"
    details = 'UB-SMoE: top-K_c experts per client, Dynamic Modulated Routing, Universal Pseudo-Gradient'
    tier_model = "global model at the tier's K_c, routing by s + φ"
    Options = UBSMoEOptions
    State = Utilisation

    def candidates(self, num_experts: int) -> int:
        n = self.options.candidates or min(num_experts, 2 * self.k_max)
        if not self.k_max <= n <= num_experts:
            raise ConfigError(f"method.candidates must lie in [K_max={self.k_max}, M={num_experts}] (routed experts: "
                              f"shared ones do not count), got {n}")
        return n

    # ------------------------------------------------------------------ server
    def prepare_model(self, model: MoEModel) -> None:
        super().prepare_model(model)
        self.phi_names = []
        if self.options.dmr:
            self.candidates(model.num_experts)  # fail before training if N_p is out of range
            self.phi_names = [model.state_name(attach_phi(layer)) for layer in model.moe_layers]

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        """FedAvg by data size of every delta but phi's; phi_bar = sum_c p_c phi_c with p_c the client's share
        of the layer's routed tokens (SPEC section 4), blended with the target: zeta phi_bar + (1 - zeta) phi~."""
        new = super().aggregate(state, updates)
        if not self.options.dmr or not updates:
            return new
        routed = torch.stack([u.routing.routed for u in updates])
        tokens = torch.stack([u.routing.tokens for u in updates])  # (C, L)
        top_k = torch.tensor([self.top_k(u.client.budget) for u in updates], dtype=torch.float64)
        usage, target = utilisation_target(routed, tokens, top_k, self.options.eps)
        usage, target = usage.nan_to_num(0.0), target.nan_to_num(0.0)  # layers no client routed a token through
        params = dict(new.params)
        zeta = self.options.zeta
        for layer_index, name in enumerate(self.phi_names):
            seen = tokens[:, layer_index]
            if seen.sum() == 0:  # no client routed a token (each ran its shared experts alone): no statistics
                continue
            share = (seen / seen.sum()).to(state.params[name].dtype)
            params[name] = state.params[name] + sum(w * u.delta[name] for w, u in zip(share, updates))
            params[name] = zeta * params[name] + (1 - zeta) * target[layer_index].to(params[name].dtype)
        return replace(new, params=params, method=Utilisation(usage, target))

    def round_report(self, state: ServerState) -> dict:
        """phi (L, E) after the round, and the utilisation and target it was pulled towards."""
        if not self.options.dmr:
            return {}
        report = {"phi": [state.params[name].tolist() for name in self.phi_names]}
        if state.method.usage is not None:
            report |= {"usage": state.method.usage.tolist(), "phi_target": state.method.phi_target.tolist()}
        return report

    # ------------------------------------------------------------------ client
    def client_hooks(self, model: MoEModel, settings: ClientSettings) -> list[MoEHook]:
        hooks: list[MoEHook] = []
        if self.options.dmr:
            hooks.append(ModulatedRouting(self.candidates(model.num_experts)))
        if self.options.pg and settings.training:  # training only, not evaluation
            hooks.append(PseudoGradient(sparsity_factor(self.options.rho, settings.top_k, self.k_max,
                                                        model.num_experts)))
        return hooks

    def local_loss(self, model: MoEModel) -> torch.Tensor | None:
        if not (self.options.dmr and self.options.phi_range):
            return None
        return self.options.phi_range_weight * sum(range_penalty(layer.modulation, self.options.phi_min, self.options.phi_max)
                                      for layer in model.moe_layers)

    def after_backward(self, model: MoEModel) -> None:
        for hook in self.hooks:
            if isinstance(hook, PseudoGradient):
                for layer in model.moe_layers:
                    hook.apply(layer)
