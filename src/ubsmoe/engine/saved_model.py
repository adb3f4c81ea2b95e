"""The model a run produces, in ``OUT/model/``, and how ``ubsmoe predict`` and ``ubsmoe evaluate`` use it.

- ``state.safetensors``: the final server state (the global trainable tensors, the method's state as
  tensors, its scalars in the metadata): what every tier's model is made of;
- ``model.json``: the format, method, task, label names, the resolved config, the backbone's identity
  (its files' names, sizes and modification times) and every tier's settings (K_c, rank);
- the upcycled experts and routers (``<key>.safetensors``, see ``model.moe_model.upcycle_cache_key``),
  so that loading the model does not cluster and calibrate again.

Loading rebuilds the run's model from the config (the backbone and the run's data files must be where the
config says: the data fix the tokenizer's settings and the calibration key), loads the state, and sets
the model up as a client of the chosen tier runs it. No pickle: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ubsmoe.config import ConfigError, ExperimentConfig, MissingFileError, config_from_dict
from ubsmoe.engine.checkpoint import CHECKPOINT, FORMAT, read_state, write_state
from ubsmoe.engine.evaluation import setup_tier
from ubsmoe.engine.experiment import Experiment, build_experiment
from ubsmoe.methods.records import ServerState, flat_scalars
from ubsmoe.model.backbones import backbone_identity
from ubsmoe.storage import DamagedFileError, write_atomically
from ubsmoe.tasks import Task, get_task

STATE, CARD = "state.safetensors", "model.json"


def save_model(folder: Path, experiment: Experiment, state: ServerState) -> Path:
    """Write the run's final model (the experiment's, in ``state``) into ``folder`` (the upcycled parts are
    already there when the run was built with ``upcycle_cache=folder``)."""
    method, config = experiment.method, experiment.config
    card = {"format": FORMAT, "method": method.name, "task": experiment.task.name,
            "label_names": experiment.data.key_names,
            "tiers": {str(b): method.eval_settings(state, b).to_scalars() for b in experiment.tiers},
            "backbone": backbone_identity(config.model.backbone), "config": config.to_dict()}
    return write_saved(folder, state, card)


def write_saved(folder: Path, state: ServerState, card: dict) -> Path:
    """``state.safetensors`` (with the card's SHA-256, so that a card that is not its own is refused) and
    ``model.json`` in ``folder``."""
    text = json.dumps(card, indent=1)
    write_state(folder / STATE, state, {"format": FORMAT, "method": card["method"], "scalars": flat_scalars(state),
                                         "card_sha256": hashlib.sha256(text.encode()).hexdigest()})
    write_atomically(folder / CARD, text)
    return folder


@dataclass
class SavedModel:
    """A saved model's files, read and verified, before anything is built: what ``predict``, ``evaluate``
    and ``export`` check their inputs against before the backbone loads."""

    run: Path  # the folder the user named
    folder: Path  # where the files are (``model_folder(run)``)
    card: dict
    state: ServerState

    @property
    def tiers(self) -> list[float]:
        """The tiers this model has (a tier's export has one)."""
        return sorted(float(t) for t in self.card["tiers"])

    def check_tier(self, budget: float) -> None:
        if budget not in self.tiers:
            raise ConfigError(f"--tier {budget:g} is not a tier of this model; its tiers are "
                              f"{', '.join(f'{t:g}' for t in self.tiers)}")

    def config(self) -> ExperimentConfig:
        config = config_from_dict(self.card["config"])
        if config.device == "cuda" and not torch.cuda.is_available():  # trained on a GPU, used on a CPU
            config = replace(config, device="auto")
        return config

    def task(self, config: ExperimentConfig | None = None) -> Task:
        """The run's task (``config``: the run's, perhaps with other data columns), without the model: it
        checks and reads input files."""
        config = config or self.config()
        return get_task(config.task)(config)


@dataclass
class LoadedModel(SavedModel):
    """A saved model rebuilt: ``experiment`` holds the model."""

    experiment: Experiment | None = None

    def setup_tier(self, budget: float) -> None:
        """Configure the model as a client of tier ``budget`` runs it at inference."""
        method, model = self.experiment.method, self.experiment.model
        self.check_tier(budget)
        method.teardown_client(model)
        setup_tier(model, method, self.state, budget)
        model.eval()


def model_folder(run: Path) -> Path:
    """Where a saved model's files are: ``run/model`` for a run's --out folder, else ``run`` itself (a
    tier's export)."""
    return run if (run / CARD).is_file() else run / "model"


def open_model(run: Path) -> SavedModel:
    """The saved model of the run in ``run`` (its ``model/`` folder), or of a sparse tier's export folder:
    its card and state, every tensor verified, and its backbone checked; nothing built."""
    if not run.is_dir():
        raise MissingFileError(f"--run {run} is not a folder: give the --out folder of a finished run (or a sparse "
                               "tier's export)")
    folder = model_folder(run)
    if not (folder / CARD).is_file() or not (folder / STATE).is_file():
        if (run / CHECKPOINT).is_file():
            raise ConfigError(f"{run} holds an unfinished run (its last checkpoint, but no saved model yet): "
                              f"finish it with `ubsmoe run --resume {run}`")
        raise ConfigError(f"{run} holds no saved model ({folder / CARD}, {folder / STATE}): give the --out folder "
                          "of a finished run (or a sparse tier's export)")
    fix = ("export the tier again (`ubsmoe export --force`)" if folder == run
           else f"run the experiment again (`ubsmoe run --force --out {run}`)")
    try:
        text = (folder / CARD).read_text(encoding="utf-8")
        card = json.loads(text)
        written = card.get("format")
        if isinstance(written, int) and written < FORMAT:
            raise ConfigError(f"{folder} was written by an earlier version of ubsmoe (format {written}; this one reads "
                              f"format {FORMAT}): {fix}")
        if written != FORMAT:
            raise ValueError(f"format {written!r}, expected {FORMAT}")
    except (ValueError, AttributeError, UnicodeDecodeError) as error:
        raise DamagedFileError(f"{folder / CARD} is damaged ({error}): {fix}") from None
    state, meta = read_state(folder / STATE, fix)
    if meta.get("card_sha256") != hashlib.sha256(text.encode()).hexdigest():
        raise DamagedFileError(f"{folder / CARD} is damaged: it is not the card written with {STATE} (SHA-256 "
                               f"mismatch): {fix}")
    now = backbone_identity(card["config"]["model"]["backbone"])
    if now != card["backbone"]:
        raise ConfigError(f"the backbone {now['name']} is not the one this model was trained on (its files differ): "
                          "restore the original checkpoint")
    return SavedModel(run, folder, card, state)


def load_model(run: Path | SavedModel) -> LoadedModel:
    """The saved model (``open_model``'s, or that of the folder ``run``) rebuilt from its config."""
    saved = run if isinstance(run, SavedModel) else open_model(run)
    experiment = build_experiment(saved.config(), upcycle_cache=saved.folder, cache_required=True)
    return LoadedModel(saved.run, saved.folder, saved.card, saved.state, experiment)
