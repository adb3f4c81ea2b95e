"""The typed records that cross between the server and a client, and that a checkpoint stores.

Everything here is tensors and scalars only, so that any transport can carry it: the in-process engine
passes the objects, Flower flattens them into its array and config records (``flat_tensors`` and
``flat_scalars`` give the flat form), a checkpoint writes them as safetensors and JSON. Counted bytes
are the bytes of these records' tensors.

- ``TrainInstruction``: server -> client at the start of a round (the tensors the client starts from,
  what the method decided for it, what it needs to rebuild changed frozen weights).
- ``ClientUpdate``: client -> server after local training (deltas, routing counts, method extras,
  metrics).
- ``ServerState``: the global tensors and the method's state between rounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

Params = dict[str, torch.Tensor]
Scalar = int | float | bool | str
Scalars = dict[str, Scalar | list[int] | list[float]]


@dataclass(frozen=True)
class ClientInfo:
    """A client as the server sees it: its id (its data partition's id), budget beta and number of
    training examples."""

    client_id: int
    budget: float
    num_examples: int


@dataclass(frozen=True)
class ClientSettings:
    """What a method decides on the server for one client's round (or one tier's evaluation).

    top_k: K_c, the experts each token activates (0: the model's own, all of them for dense models);
    rank: the LoRA rank the client trains (0: every allocated rank); training: False for a tier's
    evaluation; options: anything else a method decides, as scalars.
    """

    top_k: int = 0
    rank: int = 0
    training: bool = True
    options: Scalars = field(default_factory=dict)

    def to_scalars(self) -> Scalars:
        return {"top_k": self.top_k, "rank": self.rank, "training": self.training} | {
            f"options.{k}": v for k, v in self.options.items()}

    @classmethod
    def from_scalars(cls, scalars: Scalars) -> ClientSettings:
        options = {k.removeprefix("options."): v for k, v in scalars.items() if k.startswith("options.")}
        return cls(int(scalars["top_k"]), int(scalars["rank"]), bool(scalars["training"]), options)


@dataclass
class TrainInstruction:
    """The message that starts a client's round.

    params: the trainable tensors it starts from (by name, possibly a prefix of the model's ranks: see
    ``FederatedMethod.start_params``); frozen: what it needs to rebuild frozen weights the method
    changed (empty for most methods).
    """

    round: int
    client: ClientInfo
    settings: ClientSettings
    params: Params
    frozen: Params = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.params) + tensor_bytes(self.frozen)


@dataclass
class RoutingStats:
    """Per-layer routing counts of one client's local training (what DMR uploads).

    routed: (L, E) tokens routed to each expert; tokens: (L,) non-padding tokens seen.
    """

    routed: torch.Tensor
    tokens: torch.Tensor


@dataclass
class TrainMetrics:
    """What a client measured during its round."""

    train_loss: float = math.nan
    steps: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    train_flops: dict[str, float] = field(default_factory=dict)  # by part (see ``metrics.flops``), "total" among them
    download_bytes: int = 0
    upload_bytes: int = 0

    def to_scalars(self) -> Scalars:
        out: Scalars = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "train_flops"}
        return out | {f"train_flops.{k}": v for k, v in self.train_flops.items()}

    @classmethod
    def from_scalars(cls, scalars: Scalars) -> TrainMetrics:
        flops = {k.removeprefix("train_flops."): float(v) for k, v in scalars.items() if k.startswith("train_flops.")}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in scalars.items() if k in known}, train_flops=flops)


@dataclass
class ClientUpdate:
    """What a client sends back after local training.

    delta: trained minus received, per trainable tensor it sends (the same names and shapes as the
    instruction's params unless the method says otherwise); routing: its routing counts (sparse models);
    tensors and scalars: method extras (which defaults it moved, its next rank, ...).
    """

    client: ClientInfo
    delta: Params
    routing: RoutingStats | None = None
    tensors: Params = field(default_factory=dict)
    scalars: Scalars = field(default_factory=dict)
    metrics: TrainMetrics = field(default_factory=TrainMetrics)

    @property
    def nbytes(self) -> int:
        routing = [] if self.routing is None else [self.routing.routed, self.routing.tokens]
        return tensor_bytes(self.delta) + tensor_bytes(routing) + tensor_bytes(self.tensors)


@dataclass
class ServerState:
    """The global trainable tensors, and the method's own state between rounds as tensors and scalars
    (so that a checkpoint stores it and a fresh process resumes from it)."""

    params: Params
    tensors: Params = field(default_factory=dict)
    scalars: Scalars = field(default_factory=dict)


def tensor_bytes(tensors: Params | list[torch.Tensor]) -> int:
    """Bytes of the tensors' data: a dict's values or a list."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return sum(t.numel() * t.element_size() for t in values)


def flat_tensors(record: TrainInstruction | ClientUpdate | ServerState) -> Params:
    """Every tensor of a record under one flat namespace ("params/...", "delta/...", "routing/...")."""
    if isinstance(record, TrainInstruction):
        return prefixed("params", record.params) | prefixed("frozen", record.frozen)
    if isinstance(record, ClientUpdate):
        routing = {} if record.routing is None else {"routing/routed": record.routing.routed,
                                                       "routing/tokens": record.routing.tokens}
        return prefixed("delta", record.delta) | routing | prefixed("tensors", record.tensors)
    return prefixed("params", record.params) | prefixed("tensors", record.tensors)


def prefixed(prefix: str, tensors: Params) -> Params:
    return {f"{prefix}/{name}": value for name, value in tensors.items()}


def unprefixed(prefix: str, tensors: Params) -> Params:
    start = f"{prefix}/"
    return {name[len(start):]: value for name, value in tensors.items() if name.startswith(start)}


def flat_scalars(record: TrainInstruction | ClientUpdate | ServerState) -> Scalars:
    """Every scalar of a record under one flat namespace."""
    if isinstance(record, TrainInstruction):
        return ({"round": record.round} | client_scalars(record.client)
                | {f"settings.{k}": v for k, v in record.settings.to_scalars().items()})
    if isinstance(record, ClientUpdate):
        return (client_scalars(record.client) | {f"scalars.{k}": v for k, v in record.scalars.items()}
                | {f"metrics.{k}": v for k, v in record.metrics.to_scalars().items()})
    return {f"scalars.{k}": v for k, v in record.scalars.items()}


def client_scalars(client: ClientInfo) -> Scalars:
    return {"client.id": client.client_id, "client.budget": client.budget, "client.num_examples": client.num_examples}


def _sub(scalars: Scalars, prefix: str) -> Scalars:
    return {k[len(prefix):]: v for k, v in scalars.items() if k.startswith(prefix)}


def _client(scalars: Scalars) -> ClientInfo:
    return ClientInfo(int(scalars["client.id"]), float(scalars["client.budget"]), int(scalars["client.num_examples"]))


def instruction_from_flat(tensors: Params, scalars: Scalars) -> TrainInstruction:
    return TrainInstruction(int(scalars["round"]), _client(scalars),
                            ClientSettings.from_scalars(_sub(scalars, "settings.")),
                            unprefixed("params", tensors), unprefixed("frozen", tensors))


def update_from_flat(tensors: Params, scalars: Scalars) -> ClientUpdate:
    routing = None
    if "routing/routed" in tensors:
        routing = RoutingStats(tensors["routing/routed"], tensors["routing/tokens"])
    return ClientUpdate(_client(scalars), unprefixed("delta", tensors), routing, unprefixed("tensors", tensors),
                        _sub(scalars, "scalars."), TrainMetrics.from_scalars(_sub(scalars, "metrics.")))


def state_from_flat(tensors: Params, scalars: Scalars) -> ServerState:
    return ServerState(unprefixed("params", tensors), unprefixed("tensors", tensors), _sub(scalars, "scalars."))
