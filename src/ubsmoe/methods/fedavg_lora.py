"""FedAvg-LoRA: the dense backbone, the same LoRA rank on every client, plain FedAvg.

The homogeneous reference: a weak client runs the whole dense FFN like a strong one, so every tier
holds the same model.
"""

from __future__ import annotations

from dataclasses import replace

from ubsmoe.methods.base import FederatedMethod, register
from ubsmoe.model import ModelSpec


@register
class FedAvgLoRA(FederatedMethod):
    name = "fedavg-lora"
    description = "dense model, same LoRA rank on every client, FedAvg (homogeneous reference)"
    details = 'dense model, the same LoRA rank everywhere (homogeneous reference)'
    tier_model = 'the global dense model'
    dense = True

    def model_spec(self, spec: ModelSpec) -> ModelSpec:
        return replace(spec, num_experts=1)

    def eval_key(self, budget: float) -> str:
        return "dense"
