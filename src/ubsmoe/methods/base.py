"""The federated-method API: one base class whose hooks the round engine calls, and a registry by name.

The engine owns the round loop (sampling, local optimisation, evaluation, bookkeeping); a method says
only what differs: the model it trains, what each client starts from, how a client's training is
set up and regularised, what it uploads, and how the server aggregates. A new method is one file
that subclasses ``FederatedMethod`` and decorates itself with ``@register``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch

from ubsmoe.config import UnknownNameError
from ubsmoe.model import MoEModel, ModelSpec

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ClientInfo:
    """A client as methods see it: its id, budget beta and number of training examples."""

    client_id: int
    budget: float
    num_examples: int


@dataclass
class RoutingStats:
    """Per-layer routing counts of one client's local training (what DMR uploads).

    routed: (L, E) tokens routed to each expert; tokens: (L,) non-padding tokens seen.
    """

    routed: torch.Tensor
    tokens: torch.Tensor


@dataclass
class ClientUpdate:
    """What a client sends back after local training."""

    client: ClientInfo
    delta: Params  # trained minus received, per trainable tensor
    routing: RoutingStats | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific payload (e.g. DMR's phi)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ServerState:
    """The global model (trainable tensors) and whatever else a method keeps between rounds."""

    params: Params
    extra: dict[str, Any] = field(default_factory=dict)


def top_k_for_budget(k_max: int, budget: float) -> int:
    """K_c = max(1, floor(K_max * beta))."""
    return max(1, math.floor(k_max * budget + 1e-9))


class FederatedMethod:
    """Base class: plain FedAvg of the trainable tensors, every client at full budget.

    ``Options`` is the dataclass of the method's own hyper-parameters (``method.<field>`` in configs).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type | None] = None

    def __init__(self, options: Any, k_max: int):
        self.options = options
        self.k_max = k_max

    # ------------------------------------------------------------------ model
    def model_spec(self, spec: ModelSpec) -> ModelSpec:
        """The model this method trains, given the experiment's (sparse, upcycled by default)."""
        return spec

    # ------------------------------------------------------------------ server side
    def initial_state(self, model: MoEModel) -> ServerState:
        return ServerState(params=model.trainable_state())

    def client_params(self, state: ServerState, client: ClientInfo) -> Params:
        """The tensors client ``client`` starts local training from (a view of the global ones is fine)."""
        return state.params

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        """FedAvg: the global tensors move by the example-weighted mean of the clients' deltas."""
        return replace(state, params=weighted_delta_average(state.params, updates))

    # ------------------------------------------------------------------ communication
    def download_bytes(self, state: ServerState, client: ClientInfo) -> int:
        """Bytes the server sends client ``client`` at the start of a round: by default the tensors it
        starts from."""
        return tensor_bytes(self.client_params(state, client))

    def upload_bytes(self, update: ClientUpdate) -> int:
        """Bytes the client sends back: by default its deltas, its routing counts and any tensors in
        ``extra``."""
        routing = [] if update.routing is None else [update.routing.routed, update.routing.tokens]
        extra = [v for v in update.extra.values() if isinstance(v, torch.Tensor)]
        return tensor_bytes(update.delta) + tensor_bytes(routing + extra)

    def round_report(self, state: ServerState) -> dict[str, Any]:
        """JSON-ready facts about the server state after a round, saved under ``"server"`` in the history
        (chosen ranks, client ranks, modulation); empty by default."""
        return {}

    # ------------------------------------------------------------------ client side
    def setup_client(self, model: MoEModel, client: ClientInfo) -> None:
        """Configure the shared model for this client's training (its K_c, rank, hooks)."""

    def local_loss(self, model: MoEModel, client: ClientInfo) -> torch.Tensor | None:
        """An extra loss term added to the task loss at each local step (regularisers, aux losses)."""
        return None

    def after_backward(self, model: MoEModel, client: ClientInfo) -> None:
        """Adjust gradients after the backward pass and before the optimiser step."""

    def client_update(self, model: MoEModel, start: Params, client: ClientInfo,
                      routing: RoutingStats | None) -> ClientUpdate:
        """What the client uploads; by default the delta of every trainable tensor."""
        trained = model.trainable_state()
        return ClientUpdate(client, {n: trained[n] - start[n] for n in start}, routing)

    def teardown_client(self, model: MoEModel, client: ClientInfo) -> None:
        """Undo ``setup_client`` (remove hooks) so the shared model is clean for the next client."""

    # ------------------------------------------------------------------ evaluation
    def eval_key(self, budget: float) -> Any:
        """Tiers whose models are identical share a key, so the engine evaluates them once."""
        return budget

    def eval_params(self, state: ServerState, budget: float) -> Params:
        """The trainable tensors a client of this budget holds after the round."""
        return state.params

    def setup_eval(self, model: MoEModel, budget: float) -> None:
        """Configure the shared model as a client of this budget runs it at inference."""
        self.setup_client(model, ClientInfo(-1, budget, 0))

    def teardown_eval(self, model: MoEModel, budget: float) -> None:
        self.teardown_client(model, ClientInfo(-1, budget, 0))


def weighted_delta_average(params: Params, updates: list[ClientUpdate]) -> Params:
    """params + sum_c (n_c / N) delta_c, over the tensors each update carries."""
    if not updates:
        return params
    total = sum(u.client.num_examples for u in updates)
    new = {}
    for name, value in params.items():
        step = sum(u.delta[name] * (u.client.num_examples / total) for u in updates)
        new[name] = value + step
    return new


def tensor_bytes(tensors) -> int:
    """Bytes of the tensors' data: a dict's values or a list."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return sum(t.numel() * t.element_size() for t in values)


REGISTRY: dict[str, type[FederatedMethod]] = {}


def register(cls: type[FederatedMethod]) -> type[FederatedMethod]:
    """Class decorator: make a method available by its ``name`` to the CLI and the engine."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_method(name: str) -> type[FederatedMethod]:
    import ubsmoe.methods  # noqa: F401  (registers the built-in methods)

    if name not in REGISTRY:
        raise UnknownNameError(f"unknown method {name!r}; registered methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
