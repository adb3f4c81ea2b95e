"""What a run is built from: the config checked (``validate``, ``check_model``, before anything loads), then
the task's data, the model, the method and the clients (``build_experiment``), the same in every process
that builds it (the server, a Flower ClientApp, a saved model's loader)."""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ubsmoe.config import PROTOCOLS, ConfigError, ExperimentConfig, resolve_method_options
from ubsmoe.data.dataset import TokenizedDataset
from ubsmoe.engine.client_round import ClientRuntime
from ubsmoe.engine.population import make_clients, tiers
from ubsmoe.methods import get_method
from ubsmoe.methods.base import ClientInfo, FederatedMethod, top_k_for_budget
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.model import MoEModel, ModelSpec, build_model, load_tokenizer
from ubsmoe.model.backbones import default_shared_experts
from ubsmoe.model.moe_layer import GATE_MODES
from ubsmoe.model.moe_model import PRECISIONS, upcycle_cache_key
from ubsmoe.model.pretrained import NativeShape, backbone_config, native_moe_shape
from ubsmoe.tasks import Task, TaskData, get_task


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
        (config.evaluation.generate_questions >= 0, "evaluation.generate_questions must be >= 0 (0: every question)"),
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
    # -1 means the backbone's measured default: the config (and so every stored copy of it) holds the value used
    config.model.shared_experts = default_shared_experts(config.model.backbone, config.model.shared_experts)
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


def build_experiment(config: ExperimentConfig, upcycle_cache: Path | None = None,
                     cache_required: bool = False) -> Experiment:
    """Everything a run needs; with ``upcycle_cache`` (a folder) the upcycled experts and routers are read
    from it when an earlier build left them there (a Flower ClientApp process per message). A saved model
    is ``cache_required``: its experts must be the ones it was trained with, never split again."""
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
    if cache_required and cache is not None and not cache.is_file():
        raise ConfigError(f"{upcycle_cache} lacks the upcycled experts this model was trained with ({cache.name}): its "
                          "backbone or the run's data files changed since (they fix the experts' calibration); "
                          "restore them, or run the experiment again")
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
