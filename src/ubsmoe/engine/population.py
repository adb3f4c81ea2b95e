"""Who the clients are: their budget tiers, their shares of the training data, and who of them a round samples."""

from __future__ import annotations

import numpy as np

from ubsmoe.config import ConfigError, FederationConfig
from ubsmoe.data.partition import dirichlet_partition, iid_partition
from ubsmoe.methods.base import ClientInfo


def client_budgets(config: FederationConfig) -> list[float]:
    """Budget beta of every client: the explicit list, or the tiers assigned round-robin."""
    if config.client_budgets:
        if len(config.client_budgets) != config.num_clients:
            raise ConfigError(f"federation.client_budgets has {len(config.client_budgets)} entries for "
                              f"{config.num_clients} clients; give one budget per client")
        budgets = list(config.client_budgets)
    else:
        if not config.budgets:
            raise ConfigError("federation.budgets is empty; give at least one tier, e.g. budgets=[1.0]")
        budgets = [config.budgets[i % len(config.budgets)] for i in range(config.num_clients)]
    bad = [b for b in budgets if not 0 < b <= 1]
    if bad:
        raise ConfigError(f"budgets must lie in (0, 1], got {bad}")
    return budgets


def tiers(config: FederationConfig) -> list[float]:
    """The distinct budgets, ascending: the tiers results are reported for."""
    return sorted(set(client_budgets(config)))


def make_clients(config: FederationConfig, labels: list[int], seed: int) -> tuple[list[ClientInfo], list[np.ndarray]]:
    """(clients, their training-sample indices)."""
    if config.partition == "dirichlet":
        parts = dirichlet_partition(labels, config.num_clients, config.dirichlet_alpha, seed)
    elif config.partition == "iid":
        parts = iid_partition(len(labels), config.num_clients, seed)
    else:
        raise ConfigError(f"federation.partition must be dirichlet or iid, got {config.partition!r}")
    budgets = client_budgets(config)
    clients = [ClientInfo(i, budgets[i], len(parts[i])) for i in range(config.num_clients)]
    return clients, parts


def sample_clients(clients: list[ClientInfo], fraction: float, round_index: int, seed: int) -> list[ClientInfo]:
    """A seeded sample of max(1, round(fraction * N)) clients for this round, in id order."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"federation.fraction_fit must be in (0, 1], got {fraction}")
    count = max(1, round(fraction * len(clients)))
    if count == len(clients):
        return list(clients)
    chosen = np.random.default_rng([seed, round_index]).choice(len(clients), size=count, replace=False)
    return [clients[i] for i in sorted(chosen)]
