"""Splitting the training set over clients: Dirichlet over labels (non-IID) or uniform (IID)."""

from __future__ import annotations

import numpy as np

from ubsmoe.config import ConfigError


def dirichlet_partition(labels: list[int], num_clients: int, alpha: float, seed: int,
                        min_samples: int = 1) -> list[np.ndarray]:
    """Each label's samples are split over clients in Dirichlet(alpha) proportions.

    Every sample goes to exactly one client; draws are repeated (up to 100 times) until every client
    holds at least ``min_samples``. Returns one sorted index array per client.
    """
    if num_clients < 1:
        raise ConfigError(f"num_clients must be >= 1, got {num_clients}")
    if alpha <= 0:
        raise ConfigError(f"dirichlet_alpha must be > 0, got {alpha}")
    if len(labels) < num_clients * min_samples:
        raise ConfigError(f"{len(labels)} samples cannot give {num_clients} clients {min_samples} each")
    labels_arr = np.asarray(labels)
    rng = np.random.default_rng(seed)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in np.unique(labels_arr):
            members = rng.permutation(np.flatnonzero(labels_arr == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_samples:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ConfigError(f"no Dirichlet(alpha={alpha}) split gave every client {min_samples} samples; raise alpha")


def iid_partition(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A random permutation cut into near-equal parts."""
    if num_samples < num_clients:
        raise ConfigError(f"{num_samples} samples cannot be split over {num_clients} clients")
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]
