"""A run's records as dataclasses: each tier's scores, each round's record (accuracy, loss, cost,
balance), the run's cost and the results file (results.json) they make up.

``to_json`` gives the JSON form results.json, history.json and checkpoints store; ``from_json`` reads it
back, including results files written before a field existed (it is then None or empty). Tier keys are
the budgets as text (``"0.25"``), as in the JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from ubsmoe.metrics.balance import LoadBalance

JSON = Any  # a value json.dumps writes: dict, list, str, float, int, bool or None


def to_json(value: Any) -> JSON:
    """The JSON form of a record (its fields in order, None fields left out), of a list or dict of them."""
    if is_dataclass(value):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value) if getattr(value, f.name) is not None}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def _floats(values: dict | None) -> dict[str, float] | None:
    """Numbers by text key, as stored (a count stays an int)."""
    return None if values is None else {str(k): v if isinstance(v, int) else float(v) for k, v in values.items()}


@dataclass
class TierScore:
    """One tier's evaluation: the task's accuracy and loss, its further figures by name (causal LM: per
    task and protocol), and with the engine's counters the inference FLOPs per real token and the
    per-layer expert load (L, E) as shares of the layer's tokens."""

    accuracy: float
    loss: float
    details: dict[str, float] = field(default_factory=dict)
    inference_flops_per_token: float | None = None
    expert_load: list[list[float]] | None = None

    def scores_only(self) -> TierScore:
        """Accuracy, loss and details alone (what round 0 keeps)."""
        return TierScore(self.accuracy, self.loss, dict(self.details))

    def to_json(self) -> JSON:
        data = to_json(self)
        if not self.details:
            data.pop("details")
        return data

    @classmethod
    def from_json(cls, data: dict) -> TierScore:
        return cls(float(data["accuracy"]), float(data["loss"]), _floats(data.get("details")) or {},
                   data.get("inference_flops_per_token"), data.get("expert_load"))


@dataclass
class ClientRound:
    """What one client's round left in the history: its id, budget, mean training loss, step count, and
    (sparse models) the share of (layer, expert) pairs it routed at least one token to: the experts whose
    factors its training touched, and all an optimiser needs moments for when nothing else moves them."""

    id: int
    budget: float
    train_loss: float
    steps: int
    experts_routed: float | None = None

    @classmethod
    def from_json(cls, data: dict) -> ClientRound:
        return cls(int(data["id"]), float(data["budget"]), float(data["train_loss"]), int(data["steps"]),
                   data.get("experts_routed"))


@dataclass
class ClientCost:
    """One client's compute and communication in a round."""

    id: int
    budget: float
    train_flops: float
    train_seconds: float
    download_bytes: int
    upload_bytes: int

    @classmethod
    def from_json(cls, data: dict) -> ClientCost:
        return cls(int(data["id"]), float(data["budget"]), float(data["train_flops"]), float(data["train_seconds"]),
                   int(data["download_bytes"]), int(data["upload_bytes"]))


@dataclass
class TierCost:
    """A tier's cost: inference FLOPs per token, and where clients of the tier trained, means per client
    (in a round record) or per client and round (in the run's cost) of their training FLOPs (in total,
    by part and per token), time, median step time and bytes moved."""

    inference_flops_per_token: float
    clients: int | None = None
    train_flops: float | None = None
    train_flops_parts: dict[str, float] | None = None
    train_flops_per_token: float | None = None
    step_seconds_median: float | None = None
    train_seconds: float | None = None
    download_bytes: float | None = None
    upload_bytes: float | None = None

    @property
    def trained(self) -> bool:
        """Whether a client of this tier trained (the training figures are there)."""
        return self.train_flops is not None

    @classmethod
    def from_json(cls, data: dict) -> TierCost:
        def number(key: str) -> float | None:
            return None if data.get(key) is None else float(data[key])

        return cls(float(data["inference_flops_per_token"]), data.get("clients"), number("train_flops"),
                   _floats(data.get("train_flops_parts")), number("train_flops_per_token"),
                   number("step_seconds_median"), number("train_seconds"), number("download_bytes"),
                   number("upload_bytes"))


@dataclass
class RoundCost:
    """Compute and communication of a round: per client, and per tier (``TierCost``)."""

    clients: list[ClientCost]
    tiers: dict[str, TierCost]

    @classmethod
    def from_json(cls, data: dict) -> RoundCost:
        return cls([ClientCost.from_json(c) for c in data["clients"]],
                   {t: TierCost.from_json(c) for t, c in data["tiers"].items()})


@dataclass
class RoundBalance:
    """Expert balance of a round: the training load the clients uploaded, each tier's load on the test
    set, and the share of (layer, expert) pairs no client updated."""

    train: LoadBalance
    tiers: dict[str, LoadBalance]
    experts_without_update: float

    @classmethod
    def from_json(cls, data: dict) -> RoundBalance:
        return cls(LoadBalance.from_json(data["train"]), {t: LoadBalance.from_json(b) for t, b in data["tiers"].items()},
                   float(data["experts_without_update"]))


@dataclass
class FailedClient:
    """A sampled client whose round produced no update, and why."""

    client_id: int
    reason: str

    @classmethod
    def from_json(cls, data: dict) -> FailedClient:
        return cls(int(data["client_id"]), str(data["reason"]))


@dataclass
class RoundRecord:
    """One round after aggregation: every tier's accuracy and test loss (with their means over tiers),
    the clients that trained, per-tier expert load and task details, cost and balance, the method's own
    report on its server state (``FederatedMethod.round_report``: JSON the method defines) and the clients
    that failed."""

    round: int
    tier_accuracy: dict[str, float]
    average_accuracy: float
    tier_loss: dict[str, float]
    test_loss: float
    cost: RoundCost
    clients: list[ClientRound] = field(default_factory=list)
    tier_expert_load: dict[str, list[list[float]]] | None = None
    tier_details: dict[str, dict[str, float]] | None = None
    balance: RoundBalance | None = None
    server: dict[str, JSON] | None = None
    failed_clients: list[FailedClient] | None = None

    @classmethod
    def from_scores(cls, round_index: int, scores: dict[str, TierScore], clients: list[ClientRound],
                    cost: RoundCost) -> RoundRecord:
        accuracy = {t: s.accuracy for t, s in scores.items()}
        loss = {t: s.loss for t, s in scores.items()}
        loads = {t: s.expert_load for t, s in scores.items() if s.expert_load is not None}
        details = {t: dict(s.details) for t, s in scores.items() if s.details}
        return cls(round_index, accuracy, sum(accuracy.values()) / len(accuracy), loss,
                   sum(loss.values()) / len(loss), cost, clients, loads or None, details or None)

    def to_json(self, with_clients: bool = True) -> JSON:
        """The JSON form, in the key order results.json has always had (the clients after the losses)."""
        data = to_json(self)
        data.pop("clients")
        order = ["round", "tier_accuracy", "average_accuracy", "tier_loss", "test_loss"]
        head = {k: data.pop(k) for k in order}
        if with_clients:
            head["clients"] = to_json(self.clients)
        if "tier_expert_load" in data:
            head["tier_expert_load"] = data.pop("tier_expert_load")
        if "tier_details" in data:
            head["tier_details"] = data.pop("tier_details")
        return head | data

    @classmethod
    def from_json(cls, data: dict) -> RoundRecord:
        return cls(int(data["round"]), _floats(data["tier_accuracy"]), float(data["average_accuracy"]),
                   _floats(data["tier_loss"]), float(data["test_loss"]), RoundCost.from_json(data["cost"]),
                   [ClientRound.from_json(c) for c in data.get("clients", [])], data.get("tier_expert_load"),
                   None if data.get("tier_details") is None else {t: _floats(d) for t, d in data["tier_details"].items()},
                   None if data.get("balance") is None else RoundBalance.from_json(data["balance"]),
                   data.get("server"),
                   None if data.get("failed_clients") is None else [FailedClient.from_json(f)
                                                                   for f in data["failed_clients"]])


@dataclass
class RunCost:
    """The run's cost per tier over all rounds, the low tier's reductions against the top tier (1 - low
    / high, by figure) and the peak resident memory (MiB) of the process that ran the server."""

    tiers: dict[str, TierCost]
    low_tier_reduction: dict[str, float]
    peak_rss_mb: float

    @classmethod
    def from_json(cls, data: dict) -> RunCost:
        return cls({t: TierCost.from_json(c) for t, c in data["tiers"].items()}, _floats(data["low_tier_reduction"]),
                   float(data["peak_rss_mb"]))


@dataclass
class ClientRecord:
    """A client of the run: id, budget, training examples and their count per label (or task)."""

    id: int
    budget: float
    num_examples: int
    label_counts: list[int]

    @classmethod
    def from_json(cls, data: dict) -> ClientRecord:
        return cls(int(data["id"]), float(data["budget"]), int(data["num_examples"]), list(data["label_counts"]))


@dataclass
class RunResults:
    """A finished run (results.json). ``config`` is the resolved configuration as
    ``ExperimentConfig.to_dict`` writes it (``config.config_from_dict`` checks and types it again);
    ``k_max`` counts the shared experts; ``round0`` holds each tier's scores before training (empty where
    not evaluated); ``final`` is the last round's record."""

    method: str
    config: dict[str, JSON]
    task: str
    label_names: list[str]
    num_train: int
    num_test: int
    duplicates_removed: int
    tiers: list[float]
    clients: list[ClientRecord]
    parameters: dict[str, int]
    k_max: int
    shared_experts: int
    round0: dict[str, TierScore]
    history: list[RoundRecord]
    cost: RunCost
    runtime_s: float
    engine: str = ""
    variant: str | None = None  # the comparison's label of the run

    @property
    def final(self) -> RoundRecord:
        return self.history[-1]

    @property
    def label(self) -> str:
        """The variant's label where the run belongs to a comparison, else the method's name."""
        return self.variant or self.method

    def to_json(self) -> JSON:
        data: dict[str, JSON] = {} if self.variant is None else {"variant": self.variant}
        for f in fields(self):
            if f.name == "variant":
                continue
            value = getattr(self, f.name)
            if f.name == "history":
                data["history"] = [r.to_json() for r in value]
                data["final"] = value[-1].to_json(with_clients=False)
            elif f.name == "round0":
                data["round0"] = {t: s.to_json() for t, s in value.items()}
            else:
                data[f.name] = to_json(value)
        return data

    @classmethod
    def from_json(cls, data: dict) -> RunResults:
        """Read results.json, written by this version or one since the run's cost was recorded (keys added
        later take their defaults: no shared experts, no round-0 scores, the task the config names, the
        engine unknown)."""
        return cls(
            method=str(data["method"]), config=data["config"],
            task=str(data.get("task") or data["config"].get("task", "classification")),
            label_names=list(data["label_names"]), num_train=int(data["num_train"]), num_test=int(data["num_test"]),
            duplicates_removed=int(data["duplicates_removed"]), tiers=[float(t) for t in data["tiers"]],
            clients=[ClientRecord.from_json(c) for c in data["clients"]], parameters=dict(data["parameters"]),
            k_max=int(data["k_max"]), shared_experts=int(data.get("shared_experts", 0)),
            round0={t: TierScore.from_json(s) for t, s in data.get("round0", {}).items()},
            history=[RoundRecord.from_json(r) for r in data["history"]], cost=RunCost.from_json(data["cost"]),
            runtime_s=float(data["runtime_s"]), engine=str(data.get("engine", "")), variant=data.get("variant"))

