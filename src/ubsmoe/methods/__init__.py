"""Federated methods, one file each, registered by name (``ubsmoe methods`` lists them)."""

from ubsmoe.methods import (  # noqa: F401  (registration)
    a3smoe, default_moe, fedavg_lora, flexlora, flora, florist, hetlora, smoe, smoe_aux, smoe_bias, ubsmoe,
)
from ubsmoe.methods.base import REGISTRY, FederatedMethod, get_method, register

__all__ = ["REGISTRY", "FederatedMethod", "get_method", "register"]
