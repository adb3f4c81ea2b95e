"""The federated-method API: one base class whose hooks the round engine calls, and a registry by name.

The engine owns the round loop (sampling, local optimisation, evaluation, bookkeeping); a method says
only what differs: the model it trains, what each client starts from, how a client's training is
set up and regularised, what it uploads, and how the server aggregates. A new method is one file
that subclasses ``FederatedMethod`` and decorates itself with ``@register``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, ClassVar

import torch

from ubsmoe.config import ConfigError
from ubsmoe.methods.records import (ClientInfo, ClientSettings, ClientUpdate, MethodRecord, NoRecord, Params, RoutingStats,
                                    ServerState)
from ubsmoe.model import MoEModel, ModelSpec


def top_k_for_budget(k_max: int, budget: float) -> int:
    """K_c = max(1, floor(K_max * beta))."""
    return max(1, math.floor(k_max * budget + 1e-9))


class FederatedMethod:
    """Base class: plain FedAvg of the trainable tensors, every client at full budget.

    ``Options`` is the dataclass of the method's own hyper-parameters (``method.<field>`` in configs).
    ``State``, ``Extras`` and ``Frozen`` are the ``MethodRecord`` types of what the method keeps on the
    server between rounds (``ServerState.method``), what its clients upload beside their deltas
    (``ClientUpdate.extras``) and what a client needs to rebuild frozen weights the method changed
    (``TrainInstruction.frozen``); none by default. Transports and checkpoints carry them by these types.

    The hooks fall in two groups that share nothing but the records of ``methods.records``: server
    hooks (``initial_state``, ``client_settings``, ``client_params``, ``frozen_state``, ``aggregate``,
    the evaluation hooks) read and write the ``ServerState``; client hooks (``sync_frozen``,
    ``start_params``, ``setup_client`` ... ``teardown_client``) see only the model, the options and what
    the instruction carries, so a client in another process runs them from the same config.
    ``prepare_model`` runs on both sides, on every model built.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""  # one line, for ``ubsmoe methods``
    details: ClassVar[str] = ""  # what it does, for the README's table (``ubsmoe methods --markdown``)
    tier_model: ClassVar[str] = ""  # the model a client of a tier holds after a round
    Options: ClassVar[type | None] = None
    State: ClassVar[type[MethodRecord]] = NoRecord
    Extras: ClassVar[type[MethodRecord]] = NoRecord
    Frozen: ClassVar[type[MethodRecord]] = NoRecord
    # Traits the CLI, export and the tests read instead of lists of names:
    dense: ClassVar[bool] = False  # trains the dense backbone (one expert per FFN): exports as a PEFT adapter
    rank_heterogeneous: ClassVar[bool] = False  # clients train LoRA ranks r_c by budget
    merges_into_base: ClassVar[bool] = False  # folds each round's update into the frozen weights

    def __init__(self, options: Any, k_max: int):
        self.options = options
        self.k_max = k_max  # the routed experts a full-budget client activates (K_max - S)
        self.shared_experts = 0  # S, the always-on shared expert slots of every layer (set with k_max)

    def top_k(self, budget: float) -> int:
        """The routed experts a client of this budget activates: K_c - S, where K_c = max(1, floor(K_max beta))
        counts the S shared experts (K_max = ``k_max`` + S). A K_c below S is a ``ConfigError``."""
        k_c = top_k_for_budget(self.k_max + self.shared_experts, budget)
        if k_c < self.shared_experts:
            raise ConfigError(f"budget {budget:g} gives K_c = {k_c} experts, fewer than the {self.shared_experts} "
                              "shared ones (model.shared_experts): raise the budget or lower model.shared_experts")
        return k_c - self.shared_experts

    # ------------------------------------------------------------------ model (both sides)
    def model_spec(self, spec: ModelSpec) -> ModelSpec:
        """The model this method trains, given the experiment's (sparse, upcycled by default)."""
        return spec

    def prepare_model(self, model: MoEModel) -> None:
        """Add or unfreeze what the method trains or shares (parameters, buffers) on a freshly built model;
        runs wherever a model is built (the server's, every client process's)."""

    # ------------------------------------------------------------------ server side
    def initial_state(self, model: MoEModel) -> ServerState:
        return ServerState(model.trainable_state(), self.State())

    def tier_settings(self, budget: float) -> ClientSettings:
        """What a client of this budget runs: its K_c or rank (the full model here)."""
        return ClientSettings()

    def client_settings(self, state: ServerState, client: ClientInfo) -> ClientSettings:
        """The one hook through which the server decides a client's round: its tier's settings by default."""
        return self.tier_settings(client.budget)

    def client_params(self, state: ServerState, client: ClientInfo) -> Params:
        """The tensors the server sends client ``client`` to start local training from."""
        return state.params

    def frozen_state(self, state: ServerState) -> MethodRecord:
        """What a client needs to rebuild frozen weights the method has changed (see ``sync_frozen``);
        nothing by default."""
        return self.Frozen()

    def aggregate(self, state: ServerState, updates: list[ClientUpdate]) -> ServerState:
        """FedAvg: the global tensors move by the example-weighted mean of the clients' deltas."""
        return replace(state, params=weighted_delta_average(state.params, updates))

    def round_report(self, state: ServerState) -> dict[str, Any]:
        """JSON-ready facts about the server state after a round, saved under ``"server"`` in the history
        (chosen ranks, client ranks, modulation); empty by default."""
        return {}

    # ------------------------------------------------------------------ client side
    def sync_frozen(self, model: MoEModel, frozen: MethodRecord) -> None:
        """Bring the model's frozen weights to what ``frozen`` describes (idempotent)."""

    def start_params(self, model: MoEModel, received: Params, settings: ClientSettings) -> Params:
        """The full trainable tensors to load, from what the instruction carried (as is by default)."""
        return received

    def setup_client(self, model: MoEModel, settings: ClientSettings) -> None:
        """Configure the model for this round's training or a tier's evaluation (K_c, rank, hooks)."""

    def local_loss(self, model: MoEModel) -> torch.Tensor | None:
        """An extra loss term added to the task loss at each local step (regularisers, aux losses)."""
        return None

    def after_backward(self, model: MoEModel) -> None:
        """Adjust gradients after the backward pass and before the optimiser step."""

    def client_update(self, model: MoEModel, start: Params, client: ClientInfo, settings: ClientSettings,
                      routing: RoutingStats | None) -> ClientUpdate:
        """What the client uploads; by default the delta of every trainable tensor."""
        trained = model.trainable_state()
        return ClientUpdate(client, {n: trained[n] - start[n] for n in start}, routing)

    def teardown_client(self, model: MoEModel) -> None:
        """Undo ``setup_client`` (remove hooks) so the model is clean for the next client or tier."""

    # ------------------------------------------------------------------ evaluation (server side)
    def eval_key(self, budget: float) -> Any:
        """Tiers whose models are identical share a key, so the engine evaluates them once."""
        return budget

    def eval_params(self, state: ServerState, budget: float) -> Params:
        """The trainable tensors a client of this budget holds after the round."""
        return state.params

    def eval_settings(self, state: ServerState, budget: float) -> ClientSettings:
        """How a client of this budget runs the model at inference."""
        return replace(self.tier_settings(budget), training=False)


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


REGISTRY: dict[str, type[FederatedMethod]] = {}


def register(cls: type[FederatedMethod]) -> type[FederatedMethod]:
    """Class decorator: make a method available by its ``name`` to the CLI and the engine."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def methods_markdown() -> str:
    """The README's table of methods, from the registry: name, what it does, the tier's model, its kind."""
    from ubsmoe.config import ExperimentConfig

    default = ExperimentConfig().method_name
    lines = ["| method | what it does | a tier's model | kind |", "|---|---|---|---|"]
    for name in sorted(REGISTRY, key=lambda n: (REGISTRY[n].dense, n != default, n)):
        method = REGISTRY[name]
        kind = ("dense, rank r_c" if method.rank_heterogeneous else "dense") if method.dense else "sparse, top-K_c"
        kind += ", merged into the base" if method.merges_into_base else ""
        label = f"`{name}`" + (" (default)" if name == default else "")
        lines.append(f"| {label} | {method.details or method.description} | {method.tier_model} | {kind} |")
    return "\n".join(lines) + "\n"

