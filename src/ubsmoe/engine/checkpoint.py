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

from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from ubsmoe.config import ConfigError
from ubsmoe.methods.records import ServerState, flat_scalars, flat_tensors, state_from_flat

CHECKPOINT = "checkpoint.safetensors"
FORMAT = 1


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read or does not fit the run."""


@dataclass
class Checkpoint:
    round: int  # the last round whose aggregation and evaluation it includes
    state: ServerState
    history: list[dict]
    round0: dict
    config: dict  # ExperimentConfig.to_dict() of the run
    runtime_s: float  # seconds run before this checkpoint, over every resume


def write_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    """``folder/checkpoint.safetensors``: temporary file, fsync, rename, fsync of the folder."""
    meta = {"format": FORMAT, "round": checkpoint.round, "scalars": flat_scalars(checkpoint.state),
            "history": checkpoint.history, "round0": checkpoint.round0, "config": checkpoint.config,
            "runtime_s": checkpoint.runtime_s}
    return write_state(folder / CHECKPOINT, checkpoint.state, meta, fault_round=checkpoint.round)


def write_state(path: Path, state: ServerState, meta: dict, fault_round: int | None = None) -> Path:
    """The state's tensors (flat names) with ``meta`` as JSON in the safetensors metadata, written whole or
    not at all (temporary file, fsync, rename, fsync of the folder)."""
    tensors = {name: value.detach().contiguous().clone() for name, value in flat_tensors(state).items()}
    data = save_tensors(tensors, metadata={"ubsmoe": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.partial"
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if fault_round is not None:
        fault_point("checkpoint", fault_round)
    os.replace(temporary, path)
    for stale in path.parent.glob(f".{path.name}.*.partial"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    _fsync_folder(path.parent)
    return path


def read_state(path: Path) -> tuple[ServerState, dict]:
    """(the state, its metadata) from a file ``write_state`` wrote; ``ValueError``-family errors if damaged."""
    with safe_open(path, "pt") as handle:
        meta = json.loads((handle.metadata() or {})["ubsmoe"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT}")
    return state_from_flat(tensors, meta["scalars"]), meta


def write_atomically(path: Path, text: str) -> None:
    """A text file written whole or not at all: temporary file, fsync, rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def read_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint in ``folder``; a missing, truncated or foreign file is a ``CheckpointError``."""
    path = folder / CHECKPOINT
    if not path.is_file():
        raise CheckpointError(f"{folder} holds no checkpoint ({CHECKPOINT}): nothing to resume")
    try:
        state, meta = read_state(path)
        return Checkpoint(int(meta["round"]), state, meta["history"], meta["round0"], meta["config"],
                          float(meta["runtime_s"]))
    except (SafetensorError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is damaged ({error}): delete it, or run with --force to start over") from None


def fault_point(phase: str, round_index: int) -> None:
    """Fault injection for the crash tests: with UBSMOE_FAULT=kill:<phase>:<round> in the environment the
    process kills itself (SIGKILL) on reaching that phase of that round. Unset, this does nothing."""
    fault = os.environ.get("UBSMOE_FAULT")
    if fault and fault == f"kill:{phase}:{round_index}":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
