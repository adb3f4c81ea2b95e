"""Experiment configuration: typed dataclass sections, TOML files and ``section.key=value`` overrides.

Every field carries help text; unknown keys and values of the wrong type are refused with a message
that lists what is valid. The resolved configuration is stored with every result.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A user error: a setting, a data file, a model folder or a package the user gave or lacks; the
    message names the problem and the fix. The CLI prints it as one line (exit code 2); anything else is
    a bug and keeps its traceback."""


class MissingFileError(ConfigError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class UnknownNameError(ConfigError, KeyError):
    """A name (method, task, dataset) that no registry holds."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingPackageError(ConfigError, ImportError):
    """An optional package the user's choice needs is not installed."""


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    """A config field with help text; list defaults are copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    backbone: str = option("minilm", "built-in backbone (minilm, smollm2), a local Hugging Face checkpoint folder or a .gguf file")
    num_experts: int = option(8, "M, experts per upcycled FFN layer (must divide the FFN width)")
    shared_experts: int = option(-1, "S of the M expert slots of an upcycled FFN form an always-on shared part (its "
                                     "S h / M most important neurons); K_c counts them, so a client runs S shared and "
                                     "K_c - S routed experts; 0: every expert is routed; -1: the backbone's measured "
                                     "default (smollm2: 1; minilm and local checkpoints: 0)")
    top_k_max: int = option(0, "K_max, experts a full-budget client activates; 0 means num_experts")
    lora_rank: int = option(8, "LoRA rank r (the largest rank for heterogeneous-rank methods)")
    lora_alpha: float = option(16.0, "LoRA alpha; the update is scaled by alpha / rank")
    router_init: str = option("calibrated", "router initialisation of upcycled experts: calibrated or centroid")
    gate_mode: str = option("straight_through", "gate value of a selected expert: straight_through (value 1, "
                                                "gradient to the router; K = M equals the dense FFN), softmax (p_i) "
                                                "or softmax_renorm (p_i over the active experts' sum)")
    calibration_samples: int = option(64, "unlabelled training texts used to calibrate the routers")
    dropout: float = option(-1.0, "dropout probability of every backbone dropout layer; -1 keeps the checkpoint's")
    max_length: int = option(64, "tokens per text after truncation")


@dataclass
class DataConfig:
    dataset: str = option("bbc_news", "classification: bbc_news, or a .csv/.tsv/.jsonl/.json/.parquet file of texts and labels; "
                                      "causal-lm: commonsense:PATH, a folder of tasks in the LLM-Adapters format")
    text_column: str = option("text", "column holding the text (data files)")
    label_column: str = option("label", "column holding the label (data files)")
    header: bool = option(True, "CSV/TSV files start with a row of column names; false: columns are numbered from "
                                "0, text_column and label_column give numbers, and left at their defaults they mean "
                                "label 0, text 1 (the `label<TAB>sentence` layout)")
    test_file: str = option("", "a separate test file; empty means a stratified split of the dataset")
    test_fraction: float = option(0.2, "share of each label held out for testing when there is no test_file")
    max_train_samples: int = option(0, "use at most this many training samples (0: all)")
    max_test_samples: int = option(0, "use at most this many test samples (0: all); causal-lm: per task")
    split_seed: int = option(0, "seed of the train/test split and the sample caps, independent of `seed`, "
                                "so that every seed is scored on the same test texts")
    dedup_prefix_words: int = option(40, "texts whose first N words agree (case-folded, whitespace-normalised) "
                                         "are duplicates, and only the first is kept; 0 compares whole texts")


@dataclass
class FederationConfig:
    num_clients: int = option(8, "number of clients")
    budgets: list[float] = option([0.25, 0.5, 0.75, 1.0], "the budget tiers beta, assigned round-robin")
    client_budgets: list[float] = option([], "explicit budget per client (overrides round-robin)")
    partition: str = option("dirichlet", "how data is split over clients: dirichlet or iid")
    dirichlet_alpha: float = option(1.0, "Dirichlet concentration over labels (smaller: more skewed)")
    rounds: int = option(5, "federated rounds")
    fraction_fit: float = option(1.0, "share of clients sampled each round")
    min_clients: int = option(1, "fewest clients whose updates a round needs; fewer answers stop the run")
    max_update_norm: float = option(0.0, "largest L2 norm of a client's deltas; 0: no bound")
    update_norm_policy: str = option("clip", "an update beyond max_update_norm: clip (scaled down to it) or reject")
    on_client_error: str = option("raise", "a client whose code raises (a bug, unlike a fault: a node gone, a timeout, "
                                           "a non-finite loss, a reply that cannot be admitted, which is always left "
                                           "out): raise stops the run with its traceback; drop leaves the client out "
                                           "of the round and records it in failed_clients (fault tolerance in "
                                           "deployments)")
    client_timeout: float = option(0.0, "seconds a client's round may take; a later answer is left out of the "
                                        "round (in-process: discarded when it comes; Flower: the round's wait). "
                                        "0: no limit")
    checkpoint_every: int = option(1, "write OUT/checkpoint.safetensors every this many rounds (and after the "
                                      "last); 0: never")


@dataclass
class TrainConfig:
    local_steps: int = option(10, "optimiser steps per client per round")
    local_epochs: float = option(0.0, "if > 0, passes over the client's data per round instead of local_steps")
    batch_size: int = option(16, "local batch size")
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    eval_batch_size: int = option(64, "batch size for evaluation")
    train_on_inputs: bool = option(False, "causal-lm: the loss covers the prompt's tokens too (default: the response's only)")
    activation_checkpointing: bool = option(False, "recompute each attention block (with its input norm) and the "
                                                   "experts' merged weights in the backward instead of keeping them: "
                                                   "less memory for a slower step, the same numbers")


PROTOCOLS = ("generation", "loglik")  # what evaluation.protocol may name as causal-lm's headline accuracy


@dataclass
class EvaluationConfig:
    protocol: str = option("generation", "causal-lm: the headline accuracy, generation (generate, then read the "
                                         "answer, as LLM-Adapters) or loglik (the likeliest answer)")
    max_new_tokens: int = option(32, "causal-lm: tokens generated per question at most")
    generate_questions: int = option(0, "causal-lm: answers are generated for a seeded subset of at most this many "
                                        "of each task's scored questions (0: every one); log-likelihood scores "
                                        "every one")
    num_beams: int = option(1, "causal-lm: 1 decodes greedily; more runs beam search (LLM-Adapters used 4)")
    round0: bool = option(True, "evaluate every tier before the first round (results.json: round0)")


@dataclass
class ExperimentConfig:
    seed: int = option(0, "seed of every random choice")
    threads: int = option(2, "CPU threads torch may use")
    device: str = option("cpu", "where the model trains and is scored: cpu, cuda, or auto (cuda when there is one)")
    precision: str = option("fp32", "fp32, or bf16: the frozen weights in bfloat16, the trained tensors in float32; "
                                    "LoRA products compute in float32 and are never folded into bfloat16 weights")
    task: str = option("classification", "what is fine-tuned and scored: classification (see `ubsmoe tasks`)")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "ubsmoe"})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def method_name(self) -> str:
        return self.method["name"]


SECTIONS = ("model", "data", "federation", "train", "evaluation")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def parse_value(text: str, kind: Any, key: str) -> Any:
    """Convert the override text for ``key`` to ``kind`` (int, float, bool, str, list[float], list[int])."""
    origin = typing.get_origin(kind)
    try:
        if origin is list:
            (item,) = typing.get_args(kind)
            body = text.strip().removeprefix("[").removesuffix("]").strip()
            return [parse_value(part, item, key) for part in body.split(",")] if body else []
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return str(text)
    except ValueError:
        name = getattr(kind, "__name__", str(kind))
        raise ConfigError(f"{key}={text!r}: expected a value of type {name}") from None


def check_value(value: Any, kind: Any, key: str) -> Any:
    """Type-check a value read from TOML; ints are accepted where floats are expected."""
    origin = typing.get_origin(kind)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(kind)
        return [check_value(v, item, key) for v in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind in (int, float, bool, str) and (type(value) is not kind):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def valid_keys(method_fields: dict[str, Any] | None = None) -> list[str]:
    """Every key a config file or override may set."""
    top = [name for name, f in _fields(ExperimentConfig).items() if name not in SECTIONS + ("method",)]
    keys = top + [f"{s}.{k}" for s in SECTIONS for k in _fields(type(getattr(ExperimentConfig(), s)))]
    keys.append("method.name")
    keys += [f"method.{k}" for k in (method_fields or {})]
    return keys


def _unknown(key: str, method_fields: dict[str, Any] | None) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(valid_keys(method_fields))}")


def apply_setting(config: ExperimentConfig, key: str, value: Any, from_text: bool,
                  method_fields: dict[str, Any] | None = None) -> None:
    """Set ``key`` (``seed`` or ``section.field``) on ``config``; method keys are checked later."""
    section, _, name = key.partition(".")
    if not name:
        top = _fields(ExperimentConfig)
        if section not in top or section in SECTIONS + ("method",):
            raise _unknown(key, method_fields)
        kind = typing.get_type_hints(ExperimentConfig)[section]
        setattr(config, section, parse_value(value, kind, key) if from_text else check_value(value, kind, key))
        return
    if section == "method":
        if method_fields is not None and name != "name" and name not in method_fields:
            raise _unknown(key, method_fields)
        config.method[name] = value
        return
    if section not in SECTIONS:
        raise _unknown(key, method_fields)
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    if name not in hints:
        raise _unknown(key, method_fields)
    setattr(target, name, parse_value(value, hints[name], key) if from_text else check_value(value, hints[name], key))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                method: str | None = None, base: ExperimentConfig | None = None) -> ExperimentConfig:
    """Defaults (or ``base``: a resumed run's config), then the TOML file, then ``key=value`` overrides,
    then ``--method``. Method options are resolved against the method's own config by
    ``resolve_method_options``."""
    config = ExperimentConfig() if base is None else config_from_dict(base.to_dict())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"config file {path} is not valid TOML: {error}") from None
        apply_table(config, data)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. federation.rounds=3)")
        apply_setting(config, key.strip(), value.strip(), from_text=True)
    if method is not None:
        config.method["name"] = method
    return config


def apply_table(config: ExperimentConfig, data: dict[str, Any]) -> None:
    """Apply a table of settings ({"seed": 0, "model": {...}, ...}, as TOML or ``to_dict`` give it)."""
    for key, value in data.items():
        if isinstance(value, dict):
            for sub, sub_value in value.items():
                apply_setting(config, f"{key}.{sub}", sub_value, from_text=False)
        else:
            apply_setting(config, key, value, from_text=False)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """The config ``to_dict`` wrote (another process's, a checkpoint's): every value checked again. A key it
    lacks (written before the key existed) takes the value such runs had (``BEFORE_KEY``), else the default;
    a key renamed since (``RENAMED_KEYS``) is read under its new name."""
    config = ExperimentConfig()
    data = renamed(data)
    stored = flatten_keys(data)
    for key, value in BEFORE_KEY.items():
        if key not in stored:
            apply_setting(config, key, value, from_text=False)
    apply_table(config, data)
    return config


def resolve_method_options(config: ExperimentConfig, options_cls) -> Any:
    """Turn ``config.method`` into the method's options dataclass (typed, unknown keys refused) and
    store the resolved values back into ``config.method``."""
    method_fields = typing.get_type_hints(options_cls) if options_cls is not None else {}
    values = {}
    for key, value in config.method.items():
        if key == "name":
            continue
        if key not in method_fields:
            if RENAMED_KEYS.get(f"method.{key}", "").removeprefix("method.") in method_fields:
                raise ConfigError(f"method.{key} is now called {RENAMED_KEYS[f'method.{key}']}: set that instead")
            raise _unknown(f"method.{key}", method_fields)
        kind = method_fields[key]
        values[key] = parse_value(value, kind, f"method.{key}") if isinstance(value, str) and kind is not str \
            else check_value(value, kind, f"method.{key}")
    options = options_cls(**values) if options_cls is not None else None
    config.method = {"name": config.method_name} | (dataclasses.asdict(options) if options is not None else {})
    return options


def flatten_keys(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections -> {"section.key": value} (``data.dataset``, ``method.zeta``)."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat |= flatten_keys(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value
    return flat


def describe(config_cls=ExperimentConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for ``ubsmoe run --help-config``."""
    rows = []
    for f in dataclasses.fields(config_cls):
        if dataclasses.is_dataclass(f.default_factory() if f.default_factory is not dataclasses.MISSING else None):
            rows += describe(type(f.default_factory()), f"{f.name}.")
        elif f.name != "method":
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((prefix + f.name, json.dumps(default), f.metadata.get("help", "")))
    return rows


# Keys whose default differs from what runs written before the key existed did.
BEFORE_KEY = {"model.shared_experts": 0}

# Keys renamed since: a stored config (a finished run's, a checkpoint's) is read under the new names.
RENAMED_KEYS = {"method.lam": "method.phi_range_weight", "method.reg": "method.phi_range"}


def renamed(data: dict[str, Any]) -> dict[str, Any]:
    """A stored config (nested, as ``to_dict`` writes it) with the keys of ``RENAMED_KEYS`` under their new names."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for old, new in RENAMED_KEYS.items():
        section, _, name = old.partition(".")
        if name in out.get(section, {}):
            out[section][new.partition(".")[2]] = out[section].pop(name)
    return out

# Keys that cannot change a run's numbers: a resumed run may set them to other values than its checkpoint's.
RESUME_FREE_KEYS = ("threads", "train.activation_checkpointing")

# Keys added since without changing any number the runs before them made: their defaults are what those
# runs did. Any other missing key makes a stored run another config.
NEUTRAL_NEW_KEYS = ("task", "train.activation_checkpointing", "model.shared_experts", "evaluation.generate_questions", "train.train_on_inputs", "evaluation.protocol", "evaluation.max_new_tokens",
                    "evaluation.num_beams", "evaluation.round0", "data.header", "federation.min_clients",
                    "federation.checkpoint_every", "federation.max_update_norm", "federation.update_norm_policy",
                    "federation.client_timeout", "federation.on_client_error", "device", "precision")


def differing_keys(stored: dict[str, Any], wanted: ExperimentConfig) -> list[str]:
    """The keys whose values differ between a stored config (``to_dict`` of a finished run or a checkpoint)
    and ``wanted`` (method options resolved)."""
    import json

    stored_flat = flatten_keys(renamed(json.loads(json.dumps(stored))))
    wanted_flat = flatten_keys(json.loads(json.dumps(wanted.to_dict())))
    defaults = flatten_keys(json.loads(json.dumps(ExperimentConfig().to_dict())))
    stored_flat |= {k: BEFORE_KEY.get(k, defaults[k]) for k in NEUTRAL_NEW_KEYS if k not in stored_flat}
    return sorted(k for k in set(stored_flat) | set(wanted_flat) if stored_flat.get(k, "(missing)") != wanted_flat.get(k))
