"""Federated methods, one file each, registered by name (``ubsmoe methods`` lists them)."""

from ubsmoe.methods import fedavg_lora, smoe, ubsmoe  # noqa: F401  (registration)
from ubsmoe.methods.base import REGISTRY, FederatedMethod, get_method, register

__all__ = ["REGISTRY", "FederatedMethod", "get_method", "register"]
