"""The in-process engine: the server's round loop, every sampled client run in turn on one shared model.

The server side (sampling, the method's server hooks, aggregation, per-tier evaluation) and the client
side (``engine.client.run_client``) exchange only the records of ``methods.records``, as they do across
processes on Flower. Only the global trainable tensors and each sampled client's update are held
between clients, never a model per client. Same config and seed give the same numbers on the CPU.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ubsmoe.config import PROTOCOLS, ConfigError, ExperimentConfig, resolve_method_options
from ubsmoe.data.dataset import TokenizedDataset
from ubsmoe.engine.checkpoint import Checkpoint, check_resumable, fault_point, write_checkpoint
from ubsmoe.storage import write_atomically
from ubsmoe.engine.client import ClientRuntime, run_client
from ubsmoe.engine.clients import make_clients, sample_clients, tiers
from ubsmoe.engine.errors import ClientFault, FederationStopped, RunInterrupted
from ubsmoe.engine.evaluation import evaluate_tiers
from ubsmoe.engine.saved_model import save_model
from ubsmoe.engine.local_training import local_steps
from ubsmoe.metrics.balance import experts_without_update, load_balance
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.methods.base import ClientInfo, FederatedMethod, ServerState, get_method, top_k_for_budget
from ubsmoe.methods.records import ClientUpdate, TrainInstruction, flat_tensors
from ubsmoe.tasks import Task, TaskData, get_task
from ubsmoe.model import MoEModel, ModelSpec, build_model, load_tokenizer
from ubsmoe.model.moe_model import (PRECISIONS, NativeShape, backbone_config, native_moe_shape,
                                    upcycle_cache_key)
from ubsmoe.model.backbones import default_shared_experts
from ubsmoe.model.moe_layer import GATE_MODES

log = logging.getLogger(__name__)


@dataclass
class Experiment:
    """Everything a run needs, built once from the config."""

    config: ExperimentConfig
    task: Task
    data: TaskData
    method: FederatedMethod
    model: MoEModel
    clients: list[ClientInfo]
    client_indices: list[torch.Tensor]
    tiers: list[float]

    @property
    def train(self) -> TokenizedDataset:
        return self.data.train

    def client_runtime(self, flop_counter: FlopCounter) -> ClientRuntime:
        """The client side of this process: the same model (no copy) and FLOP counter."""
        return ClientRuntime(self.config, self.task, self.data.train, self.client_indices, self.model, self.method,
                             flop_counter)

    @property
    def test(self) -> Sized:
        return self.data.test


def validate(config: ExperimentConfig) -> None:
    """Semantic checks that types alone do not catch."""
    checks = [
        (config.federation.rounds >= 1, "federation.rounds must be >= 1"),
        (config.federation.num_clients >= 1, "federation.num_clients must be >= 1"),
        (config.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (config.train.local_steps >= 1 or config.train.local_epochs > 0, "train.local_steps must be >= 1"),
        (config.train.lr > 0, "train.lr must be > 0"),
        (config.model.num_experts >= 1, "model.num_experts must be >= 1"),
        (config.model.top_k_max >= 0, "model.top_k_max must be >= 0 (0 means all, or a native MoE's own top-k)"),
        (config.model.lora_rank >= 1, "model.lora_rank must be >= 1"),
        (config.model.shared_experts >= -1, "model.shared_experts must be >= 0 (or -1: the backbone's default)"),
        (config.model.router_init in ("calibrated", "centroid"), "model.router_init must be calibrated or centroid"),
        (config.model.gate_mode in GATE_MODES, f"model.gate_mode must be one of {', '.join(GATE_MODES)}"),
        (config.threads >= 1, "threads must be >= 1"),
        (config.model.dropout < 1, "model.dropout must be below 1 (-1 keeps the checkpoint's dropout)"),
        (config.data.dedup_prefix_words >= 0, "data.dedup_prefix_words must be >= 0 (0 compares whole texts)"),
        (config.train.eval_batch_size >= 1, "train.eval_batch_size must be >= 1"),
        (config.train.local_epochs >= 0, "train.local_epochs must be >= 0 (0 means train.local_steps)"),
        (config.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (config.model.lora_alpha > 0, "model.lora_alpha must be > 0"),
        (config.model.max_length >= 2, "model.max_length must be >= 2"),
        (config.data.max_train_samples >= 0 and config.data.max_test_samples >= 0,
         "data.max_train_samples and data.max_test_samples must be >= 0 (0 means all)"),
        (bool(config.data.test_file) or 0 < config.data.test_fraction < 1, "data.test_fraction must be in (0, 1)"),
        (config.federation.partition != "dirichlet" or config.federation.dirichlet_alpha > 0,
         "federation.dirichlet_alpha must be > 0"),
        (0 < config.federation.fraction_fit <= 1, "federation.fraction_fit must be in (0, 1]"),
        (config.federation.min_clients >= 1, "federation.min_clients must be >= 1"),
        (config.federation.min_clients <= max(1, round(config.federation.fraction_fit * config.federation.num_clients)),
         "federation.min_clients exceeds the clients sampled per round (fraction_fit x num_clients)"),
        (config.federation.checkpoint_every >= 0, "federation.checkpoint_every must be >= 0 (0: never)"),
        (config.federation.max_update_norm >= 0, "federation.max_update_norm must be >= 0 (0: no bound)"),
        (config.federation.update_norm_policy in ("clip", "reject"), "federation.update_norm_policy must be clip or reject"),
        (config.federation.client_timeout >= 0, "federation.client_timeout must be >= 0 seconds (0: no limit)"),
        (config.federation.on_client_error in ("raise", "drop"), "federation.on_client_error must be raise or drop"),
        (config.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
        (config.device in ("cpu", "cuda", "auto"), "device must be cpu, cuda or auto"),
        (config.evaluation.protocol in PROTOCOLS,
         f"evaluation.protocol must be one of {', '.join(PROTOCOLS)}, got {config.evaluation.protocol!r}"),
        (config.device != "cuda" or torch.cuda.is_available(),
         "device=cuda, but torch sees no CUDA device here: use device=cpu (or auto), or install a CUDA build of torch"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    get_task(config.task).check(config)  # an unknown task is an UnknownNameError, a user error


def check_model(config: ExperimentConfig, spec: ModelSpec) -> NativeShape | None:
    """What needs the model the method trains (its spec) and the backbone's config, before any data or
    weights are loaded; returns a native MoE backbone's M and K (None for a dense one)."""
    backbone = backbone_config(config.model.backbone)
    positions = getattr(backbone, "max_position_embeddings", None)
    if positions is not None and config.model.max_length > positions:
        raise ConfigError(f"model.max_length={config.model.max_length} exceeds the {positions} positions "
                          f"{config.model.backbone} was trained for: lower model.max_length")
    native = native_moe_shape(config.model.backbone)
    experts = native.num_experts if native else config.model.num_experts
    if config.model.top_k_max > experts:
        raise ConfigError(f"model.top_k_max={config.model.top_k_max} exceeds the {experts} experts per layer"
                          + (f" of {config.model.backbone}" if native else " (model.num_experts)"))
    shared = default_shared_experts(config.model.backbone, config.model.shared_experts)
    if not native and spec.num_experts > 1 and not 0 <= shared <= spec.num_experts - 2:
        raise ConfigError(f"model.shared_experts={shared} must lie in [0, model.num_experts - 2 = "
                          f"{spec.num_experts - 2}]: at least two experts stay routed")
    if not native and spec.num_experts > 1 and config.model.top_k_max and config.model.top_k_max <= shared:
        raise ConfigError(f"model.top_k_max={config.model.top_k_max} must exceed model.shared_experts={shared}")
    if not native and spec.num_experts > 1 and shared:
        k_max = config.model.top_k_max or spec.num_experts
        low = [(b, top_k_for_budget(k_max, b)) for b in tiers(config.federation) if top_k_for_budget(k_max, b) < shared]
        if low:
            raise ConfigError(f"budget {low[0][0]:g} gives K_c = {low[0][1]} experts, fewer than the {shared} shared ones "
                              "(model.shared_experts): raise the lowest budget or lower model.shared_experts")
    if native and config.model.shared_experts > 0:
        raise ConfigError(f"model.shared_experts applies to upcycled dense backbones; {config.model.backbone} brings its "
                          "own experts: set model.shared_experts=0")
    width = getattr(backbone, "intermediate_size", None)
    if not native and spec.num_experts > 1 and isinstance(width, int) and width % spec.num_experts:
        raise ConfigError(f"cannot split the {width} FFN neurons of {config.model.backbone} into {spec.num_experts} "
                          f"equal experts: choose model.num_experts dividing {width}")
    if not native and spec.num_experts > 1 and spec.router_init == "calibrated" and config.model.calibration_samples < 1:
        raise ConfigError("model.calibration_samples must be >= 1 with router_init=calibrated (or use router_init=centroid)")
    return native


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, or ``auto`` (cuda when torch sees a CUDA device)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_experiment(config: ExperimentConfig, upcycle_cache: Path | None = None) -> Experiment:
    """Everything a run needs; with ``upcycle_cache`` (a folder) the upcycled experts and routers are read
    from it when an earlier build left them there (a Flower ClientApp process per message)."""
    torch.set_num_threads(config.threads)
    method_cls = get_method(config.method_name)
    options = resolve_method_options(config, method_cls.Options)
    validate(config)
    method = method_cls(options, k_max=0)
    spec = method.model_spec(ModelSpec(
        backbone=config.model.backbone, num_experts=config.model.num_experts, lora_rank=config.model.lora_rank,
        lora_alpha=config.model.lora_alpha, router_init=config.model.router_init, gate_mode=config.model.gate_mode,
        seed=config.seed, precision=config.precision,
        shared_experts=default_shared_experts(config.model.backbone, config.model.shared_experts),
        dropout=None if config.model.dropout < 0 else config.model.dropout))
    native = check_model(config, spec)
    if native:  # the checkpoint's experts, router and top-k, whatever the method would upcycle
        spec = replace(spec, num_experts=native.num_experts)
    torch.manual_seed(config.seed)
    task = get_task(config.task)(config)
    data = task.load(load_tokenizer(config.model.backbone))
    train = data.train
    clients, parts = make_clients(config.federation, data.partition_keys, config.seed)

    calibration = None
    if spec.num_experts > 1 and (spec.router_init == "calibrated" or spec.shared_experts) and not native:
        # The server's calibration set: a few unlabelled training texts (labels are never read).
        chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed))
        calibration = [(ids, mask) for ids, mask, _ in train.batches(32, chosen[: config.model.calibration_samples])]
    cache = None if upcycle_cache is None or native else upcycle_cache / f"{upcycle_cache_key(spec, calibration)}.safetensors"
    model = build_model(spec, task.head(data), calibration_batches=calibration, cache=cache)
    if native:
        method.k_max = config.model.top_k_max or native.top_k
    else:
        k_max = config.model.top_k_max if (config.model.top_k_max and spec.num_experts > 1) else spec.num_experts
        method.shared_experts = model.shared_experts
        method.k_max = k_max - model.shared_experts
    method.prepare_model(model)
    model.to(resolve_device(config.device))  # the server's records stay on the CPU (``trainable_state``)
    return Experiment(config, task, data, method, model, clients, [torch.from_numpy(p) for p in parts],
                      tiers(config.federation))


class ClientFailure(NamedTuple):
    """A sampled client whose round produced no update, and why."""

    client_id: int
    reason: str


class Server:
    """The server side of a run, whatever carries the messages: the method's state, sampling, the
    instructions, aggregation, per-tier evaluation and the history. The in-process engine
    (``run_experiment``) and the Flower strategy drive the same object."""

    def __init__(self, config: ExperimentConfig, upcycle_cache: Path | None = None):
        self.started = time.perf_counter()
        self.config = config
        self.exp = build_experiment(config, upcycle_cache=upcycle_cache)
        self.method, self.model = self.exp.method, self.exp.model
        self.state = self.method.initial_state(self.model)
        self.flop_counter = FlopCounter(self.model)
        self.history: list[dict] = []
        self.round0: dict = {}
        self.updates: list[ClientUpdate] = []
        self.failures: list[ClientFailure] = []
        self.earlier_runtime_s = 0.0  # seconds run before a resume
        self.checkpoint_round = 0  # the round of the last checkpoint written or resumed from (0: none)

    def restore(self, checkpoint: Checkpoint) -> int:
        """Continue from a checkpoint of this config; returns the next round."""
        check_resumable(checkpoint, self.config)
        self.state, self.history, self.round0 = checkpoint.state, checkpoint.history, checkpoint.round0
        self.earlier_runtime_s = checkpoint.runtime_s
        self.checkpoint_round = checkpoint.round
        return checkpoint.round + 1

    def checkpoint(self, round_index: int) -> Checkpoint:
        return Checkpoint(round_index, self.state, self.history, self.round0, self.config.to_dict(),
                          self.earlier_runtime_s + time.perf_counter() - self.started)

    def evaluate_round0(self) -> None:
        """What every tier scores before any training: what fine-tuning adds is read against it."""
        before = evaluate_tiers(self.model, self.exp.task, self.method, self.state, self.exp.test, self.exp.tiers,
                                self.config.train.eval_batch_size)
        self.round0 = {str(b): {k: v for k, v in r.items() if k in ("accuracy", "loss", "details")}
                       for b, r in before.items()}

    def sample(self, round_index: int) -> list[ClientInfo]:
        return sample_clients(self.exp.clients, self.config.federation.fraction_fit, round_index, self.config.seed)

    def instruction(self, client: ClientInfo, round_index: int) -> TrainInstruction:
        return instruction_for(self.method, self.state, client, round_index)

    def admit(self, instruction: TrainInstruction, update: ClientUpdate) -> ClientUpdate | ClientFailure:
        """The update as it may enter aggregation, or why it may not: every delta must be one of the tensors
        the client was sent, with its shape, and finite (as every other float tensor it returns); deltas
        beyond ``federation.max_update_norm`` are clipped or rejected (``update_norm_policy``)."""
        client = instruction.client.client_id
        if update.client != instruction.client:
            return ClientFailure(client, f"the update is for client {update.client.client_id}, not {client}")
        for name, delta in update.delta.items():
            sent = instruction.params.get(name)
            if sent is None:
                return ClientFailure(client, f"the update holds {name!r}, which the client was not sent")
            if delta.shape != sent.shape:
                return ClientFailure(client, f"{name!r} has shape {tuple(delta.shape)}, expected {tuple(sent.shape)}")
        for name, value in update.tensors.items():  # extras named after a sent tensor (trained factors) keep its shape
            if name in instruction.params and value.shape != instruction.params[name].shape:
                return ClientFailure(client, f"{name!r} has shape {tuple(value.shape)}, "
                                             f"expected {tuple(instruction.params[name].shape)}")
        missing = sorted(set(instruction.params) - set(update.delta) - set(update.tensors))
        if missing:
            return ClientFailure(client, f"the update lacks {', '.join(map(repr, missing[:3]))}"
                                         + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        if self.model.num_experts > 1:
            layers, experts = len(self.model.moe_layers), self.model.num_experts
            if (update.routing is None or update.routing.routed.shape != (layers, experts)
                    or update.routing.tokens.shape != (layers,)):
                return ClientFailure(client, f"the update lacks routing counts of shape ({layers}, {experts}) and ({layers},)")
        if not all(bool(torch.isfinite(t).all()) for t in flat_tensors(update).values() if t.is_floating_point()):
            return ClientFailure(client, "the update holds NaN or infinite values")
        bound = self.config.federation.max_update_norm
        if bound > 0 and update.delta:
            norm = float(torch.linalg.vector_norm(torch.cat([d.double().reshape(-1) for d in update.delta.values()])))
            if norm > bound:
                if self.config.federation.update_norm_policy == "reject":
                    return ClientFailure(client, f"the update's norm {norm:.4g} exceeds federation.max_update_norm={bound:g}")
                update.delta = {n: d * (bound / norm) for n, d in update.delta.items()}
        return update

    def aggregate(self, round_index: int, updates: list[ClientUpdate], failures: list[ClientFailure] = ()) -> None:
        """Fold the round's updates into the state; fewer than ``federation.min_clients`` updates stop the run."""
        needed = self.config.federation.min_clients
        if len(updates) < needed:
            reasons = "; ".join(f"client {f.client_id}: {f.reason}" for f in failures) or "no client answered"
            raise FederationStopped(f"round {round_index}: {len(updates)} of the sampled clients returned an update, "
                               f"fewer than federation.min_clients={needed} ({reasons})")
        self.updates, self.failures = sorted(updates, key=lambda u: u.client.client_id), list(failures)
        self.state = self.method.aggregate(self.state, self.updates)

    def evaluate(self, round_index: int) -> dict:
        """Every tier after the round's aggregation; the round's history entry."""
        model, updates = self.model, self.updates
        tier_results = evaluate_tiers(model, self.exp.task, self.method, self.state, self.exp.test, self.exp.tiers,
                                      self.config.train.eval_batch_size, self.flop_counter)
        entry = round_entry(round_index, tier_results, updates)
        entry["cost"] = round_cost(tier_results, updates)
        if model.num_experts > 1:
            entry["balance"] = round_balance(model, tier_results, updates)
        fault_point("evaluate", round_index)
        report = self.method.round_report(self.state)
        if report:
            entry["server"] = report
        if self.failures:
            entry["failed_clients"] = [f._asdict() for f in self.failures]
        self.history.append(entry)
        return entry

    def save_progress(self, out: Path, round_index: int) -> None:
        """After a round's evaluation: the checkpoint and the history so far in ``out``, every
        ``federation.checkpoint_every`` rounds and after the last."""
        every, total = self.config.federation.checkpoint_every, self.config.federation.rounds
        if every > 0 and (round_index % every == 0 or round_index == total):
            write_checkpoint(out, self.checkpoint(round_index))
            self.checkpoint_round = round_index
            write_atomically(out / "history.json", json.dumps(self.history, indent=1))

    def results(self) -> dict:
        """The results dictionary (see ``ubsmoe.report.results``)."""
        exp, model, method, history = self.exp, self.model, self.method, self.history
        return {
            "method": method.name,
            "config": self.config.to_dict(),
            "task": exp.task.name,
            "label_names": exp.data.key_names,
            "num_train": len(exp.train),
            "num_test": len(exp.test),
            "duplicates_removed": exp.data.duplicates_removed,
            "tiers": exp.tiers,
            "clients": [{"id": c.client_id, "budget": c.budget, "num_examples": c.num_examples,
                         "label_counts": np.bincount(np.asarray(exp.data.partition_keys)[exp.client_indices[c.client_id].numpy()],
                                                     minlength=len(exp.data.key_names)).tolist()} for c in exp.clients],
            "parameters": model.parameter_report(),
            "k_max": method.k_max + method.shared_experts,  # K_max, counting the shared experts
            "shared_experts": method.shared_experts,
            "round0": self.round0,
            "history": history,
            "final": {k: v for k, v in history[-1].items() if k != "clients"},
            "cost": run_cost(history, exp.tiers),
            "runtime_s": self.earlier_runtime_s + time.perf_counter() - self.started,
        }


ClientFn = Callable[[TrainInstruction, Any], ClientUpdate]


def run_experiment(config: ExperimentConfig, show_progress: bool = True, client_fn: ClientFn | None = None,
                   out: Path | None = None, resume: Checkpoint | None = None) -> dict:
    """Run every round in this process and return the results dictionary (see ``ubsmoe.report.results``).

    ``client_fn(instruction, progress)`` runs a client's round; by default ``run_client`` on this
    process's model. Another transport (a client in another process, records serialised) plugs in here.
    With ``out``, a checkpoint and the history so far are written there after every
    ``federation.checkpoint_every`` rounds and after the last, and the final model into ``out/model``
    (``engine.saved_model``); ``resume`` continues from a checkpoint.

    Clients run one after the other; one whose round takes longer than ``federation.client_timeout`` is
    left out of it like a straggler a synchronous server stops waiting for (its answer is discarded when it
    comes: a client that never answers cannot be interrupted here, Flower's engines can). Dropping by time
    makes a run depend on the machine's speed: leave it at 0 where runs must repeat exactly.
    """
    server = Server(config, upcycle_cache=None if out is None else out / "model")  # the saved model's upcycled parts
    first = 1
    if resume is not None:
        first = server.restore(resume)
    elif config.evaluation.round0:
        server.evaluate_round0()
    if client_fn is None:
        runtime = server.exp.client_runtime(server.flop_counter)

        def client_fn(instruction: TrainInstruction, progress) -> ClientUpdate:
            return run_client(runtime, instruction, progress)
    total, timeout = config.federation.rounds, config.federation.client_timeout
    rounds = tqdm(range(first, total + 1), desc=f"{server.method.name} rounds", unit="round",
                  disable=not show_progress, initial=first - 1, total=total)
    round_index = first
    try:
        for round_index in rounds:
            sampled = server.sample(round_index)
            total_steps = sum(local_steps(config.train, c.num_examples) for c in sampled)
            updates = []
            with tqdm(total=total_steps, desc=f"round {round_index} clients", unit="step", leave=False,
                      disable=not show_progress) as bar:
                failures: list[ClientFailure] = []
                for client in sampled:
                    bar.set_description(f"round {round_index} client {client.client_id} (beta={client.budget:g})")
                    instruction = server.instruction(client, round_index)
                    started = time.monotonic()
                    try:
                        answer = server.admit(instruction, client_fn(instruction, bar))
                    except ClientFault as fault:  # the client did not deliver: left out, as on Flower
                        answer = ClientFailure(client.client_id, str(fault))
                    except Exception as error:  # a bug: it stops the run, unless the config asks to drop
                        if config.federation.on_client_error != "drop":
                            raise
                        log.warning("round %d: client %d raised", round_index, client.client_id, exc_info=True)
                        answer = ClientFailure(client.client_id, f"{type(error).__name__}: {error}")
                    took = time.monotonic() - started
                    if timeout and took > timeout and not isinstance(answer, ClientFailure):  # a straggler's late answer
                        answer = ClientFailure(client.client_id, f"no answer within federation.client_timeout={timeout:g} s "
                                                                 f"(it took {took:.1f} s)")
                    (failures if isinstance(answer, ClientFailure) else updates).append(answer)
                    fault_point("train", round_index)
            server.aggregate(round_index, updates, failures)
            fault_point("aggregate", round_index)
            entry = server.evaluate(round_index)
            if out is not None:
                server.save_progress(out, round_index)
            rounds.set_postfix(avg_acc=f"{entry['average_accuracy']:.3f}")
    except KeyboardInterrupt:
        raise RunInterrupted(round_index, server.checkpoint_round) from None
    if out is not None:
        save_model(out / "model", server)
    return server.results() | {"engine": "inprocess"}


def instruction_for(method: FederatedMethod, state: ServerState, client: ClientInfo, round_index: int
                    ) -> TrainInstruction:
    """The message that starts ``client``'s round: what the method decides for it and sends it."""
    return TrainInstruction(round_index, client, method.client_settings(state, client),
                            method.client_params(state, client), method.frozen_state(state))


def round_balance(model: MoEModel, tier_results: dict[float, dict], updates: list[ClientUpdate]) -> dict:
    """Expert balance of the round: global training load (from the uploaded counts), each tier's load
    on the test set, and the share of experts no client updated."""
    routed = sum(u.routing.routed for u in updates)
    return {
        "train": load_balance(routed),
        "tiers": {str(b): load_balance(torch.tensor(r["expert_load"])) for b, r in tier_results.items()},
        "experts_without_update": experts_without_update([u.delta for u in updates], model.expert_tensors(),
                                                         len(model.moe_layers), model.num_experts),
    }


def round_cost(tier_results: dict[float, dict], updates: list[ClientUpdate]) -> dict:
    """Compute and communication of the round: per client, and per tier (means over the tier's
    sampled clients, the median local step time over all their steps)."""
    clients = [{"id": u.client.client_id, "budget": u.client.budget, "train_flops": u.metrics.train_flops["total"],
                "train_seconds": u.metrics.train_seconds, "download_bytes": u.metrics.download_bytes,
                "upload_bytes": u.metrics.upload_bytes} for u in updates]
    tiers = {}
    for budget, result in tier_results.items():
        mine = [u for u in updates if u.client.budget == budget]
        tier = {"inference_flops_per_token": result["inference_flops_per_token"]}
        if mine:
            parts = mine[0].metrics.train_flops
            tier |= {
                "clients": len(mine),
                "train_flops": float(np.mean([u.metrics.train_flops["total"] for u in mine])),
                "train_flops_parts": {k: float(np.mean([u.metrics.train_flops[k] for u in mine])) for k in parts},
                "train_flops_per_token": (sum(u.metrics.train_flops["total"] for u in mine)
                                          / max(1, sum(u.metrics.train_tokens for u in mine))),
                "step_seconds_median": float(np.median([s for u in mine for s in u.metrics.step_seconds])),
                "train_seconds": float(np.mean([u.metrics.train_seconds for u in mine])),
                "download_bytes": float(np.mean([u.metrics.download_bytes for u in mine])),
                "upload_bytes": float(np.mean([u.metrics.upload_bytes for u in mine])),
            }
        tiers[str(budget)] = tier
    return {"clients": clients, "tiers": tiers}


def run_cost(history: list[dict], budgets: list[float]) -> dict:
    """The run's cost per tier over all rounds (means per client per round; the median step time over
    rounds' medians), the low tier's reductions against the top tier, and the peak resident memory."""
    tiers = {}
    for budget in map(str, budgets):
        rounds = [h["cost"]["tiers"][budget] for h in history if "train_flops" in h["cost"]["tiers"][budget]]
        tier = {"inference_flops_per_token": history[-1]["cost"]["tiers"][budget]["inference_flops_per_token"]}
        if rounds:
            for key in ("train_flops", "train_flops_per_token", "train_seconds", "download_bytes", "upload_bytes"):
                tier[key] = float(np.mean([r[key] for r in rounds]))
            tier["step_seconds_median"] = float(np.median([r["step_seconds_median"] for r in rounds]))
        tiers[budget] = tier
    low, high = tiers[str(min(budgets))], tiers[str(max(budgets))]
    reduction = {key: 1 - low[key] / high[key] for key in ("train_flops", "train_flops_per_token",
                                                           "step_seconds_median", "inference_flops_per_token")
                 if key in low and key in high and high[key] > 0}
    return {"tiers": tiers, "low_tier_reduction": reduction, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def round_entry(round_index: int, tier_results: dict[float, dict], updates) -> dict:
    tier_accuracy = {str(b): r["accuracy"] for b, r in tier_results.items()}
    tier_loss = {str(b): r["loss"] for b, r in tier_results.items()}
    entry = {
        "round": round_index,
        "tier_accuracy": tier_accuracy,
        "average_accuracy": sum(tier_accuracy.values()) / len(tier_accuracy),
        "tier_loss": tier_loss,
        "test_loss": sum(tier_loss.values()) / len(tier_loss),
        "clients": [{"id": u.client.client_id, "budget": u.client.budget, "train_loss": u.metrics.train_loss,
                     "steps": u.metrics.steps} for u in updates],
    }
    loads = {str(b): r["expert_load"] for b, r in tier_results.items() if "expert_load" in r}
    if loads:
        entry["tier_expert_load"] = loads
    details = {str(b): r["details"] for b, r in tier_results.items() if "details" in r}
    if details:  # the task's further figures per tier (causal-lm: accuracy per task and protocol)
        entry["tier_details"] = details
    return entry
