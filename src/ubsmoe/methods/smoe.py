"""Naive heterogeneous sparse MoE: client c activates its top-K_c experts, plain FedAvg, no balancing.

K_c = max(1, floor(K_max * beta_c)); a tier's model is the global one run at its K_c. The sparse
methods subclass it and say which layer hooks a client runs (``client_hooks``).
"""

from __future__ import annotations

from ubsmoe.config import ConfigError
from ubsmoe.methods.base import ClientSettings, FederatedMethod, register
from ubsmoe.model import MoEModel
from ubsmoe.model.moe_layer import MoEHook


@register
class SparseMoE(FederatedMethod):
    name = "smoe"
    description = "heterogeneous sparse MoE: top-K_c experts per client, FedAvg, no balancing"
    details = 'naive heterogeneous sparse MoE: top-K_c per client, FedAvg, no balancing'
    tier_model = 'global model at K_c'

    def __init__(self, options, k_max: int):
        super().__init__(options, k_max)
        self.hooks: list[MoEHook] = []  # the hooks of the client (or tier) the model is set up for

    def prepare_model(self, model: MoEModel) -> None:
        """Add or unfreeze what the method trains or shares (parameters, buffers); subclasses call this first."""
        if model.num_experts < 2:
            raise ConfigError(f"{self.name} needs a sparse model: set model.num_experts >= 2")

    def tier_settings(self, budget: float) -> ClientSettings:
        return ClientSettings(top_k=self.top_k(budget))

    def client_hooks(self, model: MoEModel, settings: ClientSettings) -> list[MoEHook]:
        """The hooks the layers run for this client's training or a tier's evaluation; none here."""
        return []

    def setup_client(self, model: MoEModel, settings: ClientSettings) -> None:
        model.set_top_k(settings.top_k)
        # K_c - S = 0: the shared experts run alone, and no routing mechanism has anything to act on
        self.hooks = self.client_hooks(model, settings) if settings.top_k > 0 else []
        model.attach_hooks(self.hooks)

    def teardown_client(self, model: MoEModel) -> None:
        model.detach_hooks(self.hooks)
        self.hooks = []

    def eval_key(self, budget: float) -> int:
        return self.top_k(budget)
