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

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ubsmoe.config import ConfigError, config_from_dict
from ubsmoe.methods.records import ServerState, flat_scalars, flat_tensors, state_from_flat

FORMAT = 1
STATE, CARD = "state.safetensors", "model.json"


def backbone_identity(backbone: str) -> dict:
    """The backbone's name and its files (name -> [size, modification time in ns])."""
    from ubsmoe.model.backbones import resolve_backbone

    source = resolve_backbone(backbone)
    files = [source.folder / source.gguf_file] if source.gguf_file else sorted(source.folder.iterdir())
    return {"name": backbone, "files": {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in files if p.is_file()}}


def save_model(folder: Path, server) -> Path:
    """Write the server's final model into ``folder`` (the upcycled parts are already there when the run
    was built with ``upcycle_cache=folder``)."""
    from ubsmoe.engine.checkpoint import write_atomically

    folder.mkdir(parents=True, exist_ok=True)
    state, method, exp = server.state, server.method, server.exp
    tensors = {n: v.detach().contiguous().clone() for n, v in flat_tensors(state).items()}
    data = save_tensors(tensors, metadata={"scalars": json.dumps(flat_scalars(state))})
    temporary = folder / f".{STATE}.partial"
    temporary.write_bytes(data)
    temporary.replace(folder / STATE)
    card = {"format": FORMAT, "method": method.name, "task": exp.task.name, "label_names": exp.data.key_names,
            "tiers": {str(b): method.eval_settings(state, b).to_scalars() for b in exp.tiers},
            "backbone": backbone_identity(server.config.model.backbone), "config": server.config.to_dict()}
    write_atomically(folder / CARD, json.dumps(card, indent=1))
    return folder


@dataclass
class LoadedModel:
    exp: object  # engine.simulation.Experiment
    state: ServerState
    card: dict

    def setup_tier(self, budget: float) -> None:
        """Configure the model as a client of tier ``budget`` runs it at inference."""
        method, model = self.exp.method, self.exp.model
        if budget not in self.exp.tiers:
            raise ConfigError(f"--tier {budget:g} is not a tier of this run; its tiers are "
                              f"{', '.join(f'{t:g}' for t in self.exp.tiers)}")
        method.teardown_client(model)
        method.sync_frozen(model, method.frozen_state(self.state))
        settings = method.eval_settings(self.state, budget)
        model.load_trainable_state(method.start_params(model, method.eval_params(self.state, budget), settings))
        method.setup_client(model, settings)
        model.eval()


def load_model(run: Path) -> LoadedModel:
    """The saved model of the run in ``run`` (its ``model/`` folder)."""
    from ubsmoe.engine.simulation import build_experiment

    folder = run / "model"
    if not (folder / CARD).is_file() or not (folder / STATE).is_file():
        raise ConfigError(f"{run} holds no saved model ({folder / CARD}, {folder / STATE}): give the --out folder "
                          "of a finished run")
    try:
        card = json.loads((folder / CARD).read_text())
        if card.get("format") != FORMAT:
            raise ValueError(f"format {card.get('format')!r}, expected {FORMAT}")
        data = (folder / STATE).read_bytes()
        header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
        state = state_from_flat(load_tensors(data), json.loads(header["__metadata__"]["scalars"]))
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ConfigError(f"the saved model in {folder} is damaged ({error})") from None
    now = backbone_identity(card["config"]["model"]["backbone"])
    if now != card["backbone"]:
        raise ConfigError(f"the backbone {now['name']} is not the one this model was trained on (its files differ): "
                          "restore the original checkpoint")
    exp = build_experiment(config_from_dict(card["config"]), upcycle_cache=folder)
    return LoadedModel(exp, state, card)
