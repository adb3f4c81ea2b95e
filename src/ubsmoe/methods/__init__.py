"""Federated methods, one file each, registered by name (``ubsmoe methods`` lists them)."""

from ubsmoe.methods import (  # noqa: F401  (registration)
    a3smoe, default_moe, fedavg_lora, flexlora, flora, florist, hetlora, smoe, smoe_aux, smoe_bias, ubsmoe,
)
from ubsmoe.config import UnknownNameError
from ubsmoe.methods.base import REGISTRY, FederatedMethod, register

__all__ = ["REGISTRY", "FederatedMethod", "get_method", "register"]


def get_method(name: str) -> type[FederatedMethod]:
    """The registered method of this name (the built-in ones are registered by importing this package)."""
    if name not in REGISTRY:
        raise UnknownNameError(f"unknown method {name!r}; registered methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
