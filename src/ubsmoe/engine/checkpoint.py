"""Checkpoints: a run's server state, history and config after a round, in one safetensors file written
whole or not at all, from which ``ubsmoe run --resume`` continues with exactly the numbers of an
uninterrupted run.

The file holds the ``ServerState``'s tensors under flat names (``methods.records``) and, in its
metadata, JSON text: the round, the state's scalars, the history and round-0 scores, the resolved
config and the seconds run so far. No pickle: ``safetensors`` and ``json`` only. Nothing else is
needed: clients' randomness is seeded per (seed, round, client), sampling per (seed, round), and the
model is rebuilt from the config (the merged base of FLoRA and FLoRIST from the state's records).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ubsmoe.config import ConfigError
from ubsmoe.engine.run_records import RoundRecord, TierScore
from ubsmoe.methods import get_method
from ubsmoe.methods.records import ServerState, flat_scalars, flat_tensors, state_from_flat
from ubsmoe.storage import DamagedFileError, read_tensors, write_tensors

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 3  # 2: every tensor's SHA-256 in the metadata; 3: the method's state as its typed record


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or does not fit the run."""


@dataclass
class Checkpoint:
    round: int  # the last round whose aggregation and evaluation it includes
    state: ServerState
    history: list[RoundRecord]
    round0: dict[str, TierScore]
    config: dict  # ExperimentConfig.to_dict() of the run
    runtime_s: float  # seconds run before this checkpoint, over every resume


def write_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    """``folder/checkpoint.safetensors``: temporary file, fsync, rename, fsync of the folder."""
    meta = {"format": FORMAT, "method": checkpoint.config["method"]["name"], "round": checkpoint.round,
            "scalars": flat_scalars(checkpoint.state),
            "history": [r.to_json() for r in checkpoint.history],
            "round0": {t: s.to_json() for t, s in checkpoint.round0.items()}, "config": checkpoint.config,
            "runtime_s": checkpoint.runtime_s}
    return write_state(folder / CHECKPOINT, checkpoint.state, meta, fault_round=checkpoint.round)


def write_state(path: Path, state: ServerState, meta: dict, fault_round: int | None = None) -> Path:
    """The state's tensors (flat names, each with its SHA-256) with ``meta`` as JSON in the safetensors
    metadata, written whole or not at all (``storage.write_tensors``)."""
    before_rename = None if fault_round is None else (lambda: fault_point("checkpoint", fault_round))
    return write_tensors(path, flat_tensors(state), {"ubsmoe": json.dumps(meta)}, before_rename=before_rename)


def read_state(path: Path, fix: str) -> tuple[ServerState, dict]:
    """(the state, its metadata) from a file ``write_state`` wrote (its ``meta`` names the method, whose
    ``State`` record the method's part is), every tensor verified against its digest; a damaged or foreign
    file is a ``DamagedFileError`` naming ``fix``."""
    tensors, metadata = read_tensors(path, fix)
    try:
        meta = json.loads(metadata["ubsmoe"])
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedFileError(f"{path} is damaged ({error}): {fix}") from None
    if isinstance(meta, dict) and isinstance(meta.get("format"), int) and meta["format"] < FORMAT:
        raise CheckpointError(f"{path} was written by an earlier version of ubsmoe (format {meta['format']}; this one "
                              f"reads format {FORMAT}): {fix}")
    try:
        if meta.get("format") != FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
        return state_from_flat(tensors, meta["scalars"], get_method(meta["method"]).State), meta
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as error:
        raise DamagedFileError(f"{path} is damaged ({error}): {fix}") from None


def read_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint in ``folder``; a missing, truncated or foreign file is a ``CheckpointError``."""
    path = folder / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no checkpoint ({CHECKPOINT}): nothing to resume")
    fix = "start the run over with `ubsmoe run --force`, or delete the file"
    state, meta = read_state(path, fix)
    try:
        return Checkpoint(int(meta["round"]), state, [RoundRecord.from_json(r) for r in meta["history"]],
                          {t: TierScore.from_json(s) for t, s in meta["round0"].items()}, meta["config"],
                          float(meta["runtime_s"]))
    except (ValueError, KeyError, TypeError) as error:
        raise DamagedFileError(f"{path} is damaged ({error}): {fix}") from None


def check_resumable(checkpoint: Checkpoint, config) -> None:
    """Refuse to resume ``checkpoint`` with ``config`` (an ``ExperimentConfig``, method options resolved)
    where a setting that changes numbers differs from the checkpoint's, naming only those keys."""
    from ubsmoe.config import RESUME_FREE_KEYS, differing_keys

    differing = [k for k in differing_keys(checkpoint.config, config) if k not in RESUME_FREE_KEYS]
    if differing:
        raise CheckpointError(f"these settings differ from the checkpoint's and would change the run's numbers: "
                              f"{', '.join(differing)}; resume without them (only {', '.join(RESUME_FREE_KEYS)} "
                              "may change), or start over with --force")


def fault_point(phase: str, round_index: int) -> None:
    """Fault injection for the crash tests: with UBSMOE_FAULT=kill:<phase>:<round> in the environment the
    process kills itself (SIGKILL) on reaching that phase of that round. Unset, this does nothing."""
    fault = os.environ.get("UBSMOE_FAULT")
    if fault and fault == f"kill:{phase}:{round_index}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
