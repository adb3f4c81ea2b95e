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

    def neurons(self, index: torch.Tensor, with_b_down: bool) -> "DenseFFN":
        """The FFN of the hidden neurons ``index`` (h',) only; ``b_down`` kept or dropped (it is added once,
        by whichever part always runs)."""
        return DenseFFN(self.w_up[:, index], self.w_down[index], self.activation,
                        None if self.w_gate is None else self.w_gate[:, index],
                        None if self.b_up is None else self.b_up[index], self.b_down if with_b_down else None)


def neuron_importance(ffn: DenseFFN, x: torch.Tensor) -> torch.Tensor:
    """x: (n, d) calibration inputs -> (h,): each hidden neuron's mean |activation| on them times the norm of
    its row of W_down, the size of what it adds to the output."""
    return ffn.hidden(x.to(ffn.w_up.dtype)).abs().mean(0) * ffn.w_down.norm(dim=1)


def split_shared(ffn: DenseFFN, x: torch.Tensor, num_experts: int, shared: int) -> tuple[DenseFFN, DenseFFN]:
    """(shared part, routed part) of ``ffn``: the shared part holds the ``shared * h / num_experts`` neurons
    most important on the calibration inputs x: (n, d) (``neuron_importance``) and ``b_down``; the routed
    part the others, to be split into ``num_experts - shared`` experts. Both keep the neurons' order."""
    h = ffn.w_up.shape[1]
    if h % num_experts:
        raise ConfigError(f"cannot split {h} neurons into {num_experts} equal experts: choose num_experts dividing {h}")
    chosen = torch.zeros(h, dtype=torch.bool)
    chosen[neuron_importance(ffn, x).topk(shared * h // num_experts).indices] = True
    return ffn.neurons(chosen.nonzero().squeeze(1), True), ffn.neurons((~chosen).nonzero().squeeze(1), False)


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


UPCYCLED = ("w_up", "w_down", "w_gate", "b_up", "b_down", "router")  # the routed experts' tensors of a layer
SHARED = ("shared.w_up", "shared.w_down", "shared.w_gate", "shared.b_up", "shared.b_down")  # its shared part's


def upcycled_parts(ffn: DenseFFN, num_experts: int, shared: int, x: torch.Tensor | None, router_init: str,
                   seed: int) -> dict[str, torch.Tensor]:
    """One dense FFN upcycled: the routed experts' stacked tensors (``UPCYCLED``; the router ``calibrated`` on
    the calibration inputs x: (n, d), or from the ``centroid``s) and, with ``shared`` > 0 shared expert slots,
    the shared part's as one expert (``SHARED``: w_up (1, d, S h / M), ...), chosen on x. One expert is the
    dense FFN as it is. None-valued tensors are left out."""
    routed_ffn, parts = ffn, {}
    if shared:
        if x is None:
            raise ValueError("shared experts are chosen on calibration inputs; pass some")
        shared_ffn, routed_ffn = split_shared(ffn, x, num_experts, shared)
        one = split_ffn(shared_ffn, 1)
        parts |= {"shared.w_up": one.w_up, "shared.w_down": one.w_down, "shared.w_gate": one.w_gate,
                  "shared.b_up": one.b_up, "shared.b_down": one.b_down}
    split = split_ffn(routed_ffn, num_experts - shared, seed=seed)
    router = None
    if num_experts - shared > 1:
        router = (calibrated_router(routed_ffn, split, x) if router_init == "calibrated"
                  else centroid_router(routed_ffn, split)).float()
    parts |= {"w_up": split.w_up, "w_down": split.w_down, "w_gate": split.w_gate, "b_up": split.b_up,
              "b_down": split.b_down, "router": router}
    return {name: value.contiguous() for name, value in parts.items() if value is not None}
