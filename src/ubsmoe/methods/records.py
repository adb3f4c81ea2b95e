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

A method's own parts of these records (its server state, its clients' extras, its frozen-weight record)
are ``MethodRecord`` dataclasses it declares; ``flatten`` and ``unflatten`` carry any of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from types import UnionType
from typing import TypeVar, Union, get_args, get_origin, get_type_hints

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


class MethodRecord:
    """Base of a method's own records: its server state between rounds (``FederatedMethod.State``), what its
    clients upload beside their deltas (``Extras``) and what they need to rebuild frozen weights it changed
    (``Frozen``). Each is a dataclass whose fields are tensors, scalars (int, float, bool, str), optional
    ones, nested records, and lists and dicts (keyed by int or str) of these; ``flatten`` and ``unflatten``
    turn any of them into flat tensors and scalars and back, guided by the field types alone. What holds
    no tensor and no scalar leaves nothing behind: an empty list or dict comes back as the field's default
    (give container fields one), a trailing empty list item is dropped, and an optional nested record
    whose fields are all None comes back as None."""

    def trained(self) -> Params:
        """Tensors that stand, in an update, for tensors the client was sent (by their names): the trained
        factors a client uploads instead of their deltas. None by default."""
        return {}


@dataclass
class NoRecord(MethodRecord):
    """A method without state, extras or frozen-weight records of its own."""


Record = TypeVar("Record", bound=MethodRecord)
SEPARATOR = "/"


def flatten(record: MethodRecord) -> tuple[Params, Scalars]:
    """(tensors, scalars) under names that are the record's field paths (``svd/<adapter>/u``)."""
    tensors: Params = {}
    scalars: Scalars = {}
    _flatten(record, "", tensors, scalars)
    return tensors, scalars


def _flatten(value, path: str, tensors: Params, scalars: Scalars) -> None:
    if value is None:
        return
    if isinstance(value, torch.Tensor):
        tensors[path] = value
    elif is_dataclass(value):
        for f in fields(value):
            _flatten(getattr(value, f.name), _join(path, f.name), tensors, scalars)
    elif isinstance(value, dict):
        for key, item in value.items():
            _flatten(item, _join(path, _key(key)), tensors, scalars)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _flatten(item, _join(path, str(index)), tensors, scalars)
    elif isinstance(value, (bool, int, float, str)):
        scalars[path] = value
    else:
        raise TypeError(f"{path}: a method record holds tensors, scalars, records, lists and dicts, not "
                        f"{type(value).__name__}")


def _join(path: str, name: str) -> str:
    return f"{path}{SEPARATOR}{name}" if path else name


def _key(key: int | str) -> str:
    text = str(key)
    if SEPARATOR in text or not text:
        raise ValueError(f"a method record's key must be non-empty and hold no {SEPARATOR!r}: {text!r}")
    return text


def unflatten(cls: type[Record], tensors: Params, scalars: Scalars) -> Record:
    """The record of type ``cls`` that ``flatten`` gave (tensors and scalars) back."""
    return _unflatten(cls, "", tensors, scalars)


def _unflatten(kind, path: str, tensors: Params, scalars: Scalars):
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, UnionType):  # X | None: absent is None
        present = [a for a in args if a is not type(None)]
        if not _under(path, tensors, scalars):
            return None
        return _unflatten(present[0], path, tensors, scalars)
    if kind is torch.Tensor:
        return tensors[path]
    if kind in (bool, int, float, str):
        return kind(scalars[path])
    if is_dataclass(kind):
        hints = get_type_hints(kind)
        values = {}
        for f in fields(kind):
            child = _join(path, f.name)
            if _under(child, tensors, scalars) or get_origin(hints[f.name]) in (Union, UnionType):
                values[f.name] = _unflatten(hints[f.name], child, tensors, scalars)
        return kind(**values)
    if origin is dict:
        key_type, value_type = args
        keys = _children(path, tensors, scalars)
        return {key_type(k): _unflatten(value_type, _join(path, k), tensors, scalars)
                for k in sorted(keys, key=lambda k: int(k) if key_type is int else k)}
    if origin is list:
        (item_type,) = args
        count = max((int(i) + 1 for i in _children(path, tensors, scalars)), default=0)  # empty items carry nothing
        return [_unflatten(item_type, _join(path, str(i)), tensors, scalars) for i in range(count)]
    raise TypeError(f"{path}: cannot read a method record field of type {kind}")


def _under(path: str, tensors: Params, scalars: Scalars) -> bool:
    start = _join(path, "")
    return any(n == path or n.startswith(start) for names in (tensors, scalars) for n in names)


def _children(path: str, tensors: Params, scalars: Scalars) -> set[str]:
    start = _join(path, "")
    return {n[len(start):].split(SEPARATOR, 1)[0] for names in (tensors, scalars) for n in names
            if n.startswith(start)}


@dataclass
class TrainInstruction:
    """The message that starts a client's round.

    params: the trainable tensors it starts from (by name, possibly a prefix of the model's ranks: see
    ``FederatedMethod.start_params``); frozen: what it needs to rebuild frozen weights the method
    changed (the method's ``Frozen`` record; empty for most methods).
    """

    round: int
    client: ClientInfo
    settings: ClientSettings
    params: Params
    frozen: MethodRecord = field(default_factory=NoRecord)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.params) + tensor_bytes(flatten(self.frozen)[0])


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
    extras: what the method uploads beside (its ``Extras`` record: which defaults it moved, its next
    rank, its trained factors, ...).
    """

    client: ClientInfo
    delta: Params
    routing: RoutingStats | None = None
    extras: MethodRecord = field(default_factory=NoRecord)
    metrics: TrainMetrics = field(default_factory=TrainMetrics)

    @property
    def nbytes(self) -> int:
        routing = [] if self.routing is None else [self.routing.routed, self.routing.tokens]
        return tensor_bytes(self.delta) + tensor_bytes(routing) + tensor_bytes(flatten(self.extras)[0])


@dataclass
class ServerState:
    """The global trainable tensors, and the method's own state between rounds (its ``State`` record), so
    that a checkpoint stores it and a fresh process resumes from it."""

    params: Params
    method: MethodRecord = field(default_factory=NoRecord)


def tensor_bytes(tensors: Params | list[torch.Tensor]) -> int:
    """Bytes of the tensors' data: a dict's values or a list."""
    values = tensors.values() if isinstance(tensors, dict) else tensors
    return sum(t.numel() * t.element_size() for t in values)


def flat_tensors(record: TrainInstruction | ClientUpdate | ServerState) -> Params:
    """Every tensor of a record under one flat namespace ("params/...", "delta/...", "routing/...")."""
    if isinstance(record, TrainInstruction):
        return prefixed("params", record.params) | prefixed("frozen", flatten(record.frozen)[0])
    if isinstance(record, ClientUpdate):
        routing = {} if record.routing is None else {"routing/routed": record.routing.routed,
                                                       "routing/tokens": record.routing.tokens}
        return prefixed("delta", record.delta) | routing | prefixed("extras", flatten(record.extras)[0])
    return prefixed("params", record.params) | prefixed("method", flatten(record.method)[0])


def prefixed(prefix: str, tensors: Params) -> Params:
    return {f"{prefix}/{name}": value for name, value in tensors.items()}


def unprefixed(prefix: str, tensors: Params) -> Params:
    start = f"{prefix}/"
    return {name[len(start):]: value for name, value in tensors.items() if name.startswith(start)}


def flat_scalars(record: TrainInstruction | ClientUpdate | ServerState) -> Scalars:
    """Every scalar of a record under one flat namespace."""
    if isinstance(record, TrainInstruction):
        return ({"round": record.round} | client_scalars(record.client)
                | {f"settings.{k}": v for k, v in record.settings.to_scalars().items()}
                | {f"frozen.{k}": v for k, v in flatten(record.frozen)[1].items()})
    if isinstance(record, ClientUpdate):
        return (client_scalars(record.client) | {f"extras.{k}": v for k, v in flatten(record.extras)[1].items()}
                | {f"metrics.{k}": v for k, v in record.metrics.to_scalars().items()})
    return {f"method.{k}": v for k, v in flatten(record.method)[1].items()}


def client_scalars(client: ClientInfo) -> Scalars:
    return {"client.id": client.client_id, "client.budget": client.budget, "client.num_examples": client.num_examples}


def _sub(scalars: Scalars, prefix: str) -> Scalars:
    return {k[len(prefix):]: v for k, v in scalars.items() if k.startswith(prefix)}


def _client(scalars: Scalars) -> ClientInfo:
    return ClientInfo(int(scalars["client.id"]), float(scalars["client.budget"]), int(scalars["client.num_examples"]))


def instruction_from_flat(tensors: Params, scalars: Scalars, frozen: type[MethodRecord]) -> TrainInstruction:
    """The instruction ``flat_tensors`` and ``flat_scalars`` gave; ``frozen``: the method's ``Frozen`` type."""
    return TrainInstruction(int(scalars["round"]), _client(scalars),
                            ClientSettings.from_scalars(_sub(scalars, "settings.")), unprefixed("params", tensors),
                            unflatten(frozen, unprefixed("frozen", tensors), _sub(scalars, "frozen.")))


def update_from_flat(tensors: Params, scalars: Scalars, extras: type[MethodRecord]) -> ClientUpdate:
    """The update ``flat_tensors`` and ``flat_scalars`` gave; ``extras``: the method's ``Extras`` type."""
    routing = None
    if "routing/routed" in tensors:
        routing = RoutingStats(tensors["routing/routed"], tensors["routing/tokens"])
    return ClientUpdate(_client(scalars), unprefixed("delta", tensors), routing,
                        unflatten(extras, unprefixed("extras", tensors), _sub(scalars, "extras.")),
                        TrainMetrics.from_scalars(_sub(scalars, "metrics.")))


def state_from_flat(tensors: Params, scalars: Scalars, state: type[MethodRecord]) -> ServerState:
    """The server state ``flat_tensors`` and ``flat_scalars`` gave; ``state``: the method's ``State`` type."""
    return ServerState(unprefixed("params", tensors), unflatten(state, unprefixed("method", tensors),
                                                                _sub(scalars, "method.")))
