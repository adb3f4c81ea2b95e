"""Upcycling a dense FFN into experts by splitting its hidden neurons ("MoEfication").

The hidden neurons are partitioned into M equal groups by balanced spherical k-means on their input
weights, so that neurons that respond to similar inputs share an expert; each group becomes one expert.
Summing all M experts with gate 1 gives back the dense FFN exactly. The router is initialised so that
top-K picks the groups that matter for a token: from the cluster centroids, or by a ridge fit of the
experts' output norms on calibration activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ubsmoe.config import ConfigError

ROUTER_INITS = ("centroid", "calibrated")


@dataclass
class DenseFFN:
    """The frozen weights of one dense FFN in (in, out) layout.

    w_up: (d, h); w_down: (h, d); w_gate: (d, h) for gated FFNs (act(x Wg) * x Wu); b_up: (h,); b_down: (d,).
    """

    w_up: torch.Tensor
    w_down: torch.Tensor
    activation: Callable[[torch.Tensor], torch.Tensor]
    w_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None
    b_down: torch.Tensor | None = None

    @property
    def selector_weights(self) -> torch.Tensor:
        """(h, d): each hidden neuron's input weights, the ones that decide whether it fires."""
        return (self.w_gate if self.w_gate is not None else self.w_up).T

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, d) -> hidden activations (n, h)."""
        up = x @ self.w_up
        if self.b_up is not None:
            up = up + self.b_up
        return self.activation(x @ self.w_gate) * up if self.w_gate is not None else self.activation(up)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: (n, d) -> (n, d)."""
        y = self.hidden(x) @ self.w_down
        return y + self.b_down if self.b_down is not None else y


@dataclass
class ExpertSplit:
    """A dense FFN split into M experts: ``groups: (M, h/M)`` neuron indices and the stacked weights."""

    groups: torch.Tensor
    w_up: torch.Tensor  # (M, d, h/M)
    w_down: torch.Tensor  # (M, h/M, d)
    w_gate: torch.Tensor | None  # (M, d, h/M)
    b_up: torch.Tensor | None  # (M, h/M)
    b_down: torch.Tensor | None  # (d,), shared: added once, not per expert


def balanced_assign(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row to a column, at most ``capacity`` rows a column, greedily by similarity.

    similarity: (n, k) with n == k * capacity -> (n,) column of each row.
    """
    n, k = similarity.shape
    order = similarity.reshape(-1).argsort(descending=True, stable=True).tolist()
    assignment = [-1] * n
    load = [0] * k
    left = n
    for flat in order:
        row, col = divmod(flat, k)
        if assignment[row] < 0 and load[col] < capacity:
            assignment[row] = col
            load[col] += 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(assignment)


def balanced_kmeans(vectors: torch.Tensor, k: int, iterations: int = 30, seed: int = 0) -> torch.Tensor:
    """Spherical k-means with equal cluster sizes. vectors: (n, d), n divisible by k -> (n,) cluster ids."""
    n = vectors.shape[0]
    if n % k:
        raise ConfigError(f"cannot split {n} neurons into {k} equal experts: choose num_experts dividing {n}")
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    generator = torch.Generator().manual_seed(seed)
    # k-means++ seeding on cosine distance
    centroids = [unit[torch.randint(n, (1,), generator=generator).item()]]
    for _ in range(1, k):
        distance = (1 - unit @ torch.stack(centroids).T).min(1).values.clamp_min(0)
        centroids.append(unit[torch.multinomial(distance + 1e-12, 1, generator=generator).item()])
    centroids = torch.stack(centroids)
    assignment = None
    for _ in range(iterations):
        new = balanced_assign(unit @ centroids.T, n // k)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centroids = torch.nn.functional.normalize(
            torch.zeros(k, unit.shape[1], dtype=unit.dtype).index_add(0, assignment, unit), dim=1
        )
    return assignment


def split_ffn(ffn: DenseFFN, num_experts: int, seed: int = 0) -> ExpertSplit:
    """Partition the hidden neurons of ``ffn`` into ``num_experts`` equal groups and stack their weights."""
    h = ffn.w_up.shape[1]
    if num_experts == 1:
        groups = torch.arange(h).unsqueeze(0)
    else:
        assignment = balanced_kmeans(ffn.selector_weights, num_experts, seed=seed)
        groups = torch.stack([(assignment == e).nonzero().squeeze(1) for e in range(num_experts)])
    take_cols = lambda w: None if w is None else torch.stack([w[:, g] for g in groups])  # noqa: E731
    return ExpertSplit(
        groups=groups,
        w_up=take_cols(ffn.w_up),
        w_down=torch.stack([ffn.w_down[g] for g in groups]),
        w_gate=take_cols(ffn.w_gate),
        b_up=None if ffn.b_up is None else torch.stack([ffn.b_up[g] for g in groups]),
        b_down=ffn.b_down,
    )


def centroid_router(ffn: DenseFFN, split: ExpertSplit) -> torch.Tensor:
    """(M, d): each expert's mean neuron input weight, so x . w_e is the group's mean pre-activation."""
    weights = ffn.selector_weights
    return torch.stack([weights[g].mean(0) for g in split.groups])


def expert_output_norms(ffn: DenseFFN, split: ExpertSplit, x: torch.Tensor) -> torch.Tensor:
    """x: (n, d) -> (n, M): the norm of each expert's output for each token (its importance)."""
    hidden = ffn.hidden(x)
    return torch.stack([(hidden[:, g] @ ffn.w_down[g]).norm(dim=1) for g in split.groups], dim=1)


def calibrated_router(ffn: DenseFFN, split: ExpertSplit, x: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """(M, d): ridge regression of the per-token standardised expert output norms on x: (n, d).

    The fitted scores rank experts by how much they contribute to the token's output, which is what
    top-K selection should keep.
    """
    target = expert_output_norms(ffn, split, x).double()
    x = x.double()
    target = (target - target.mean(1, keepdim=True)) / (target.std(1, keepdim=True) + 1e-6)
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.solve(gram, x.T @ target).T
