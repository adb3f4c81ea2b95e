"""The files ubsmoe writes and reads back: tensors that are verified when read, and outputs written whole
or not at all, never over an input of the same command.

- ``write_tensors`` / ``read_tensors``: a safetensors file whose metadata holds the SHA-256 of every
  tensor (dtype, shape and bytes) and of the rest of the metadata; reading recomputes them, so flipped
  bytes anywhere are a ``DamagedFileError`` instead of silently different numbers.
- ``write_atomically``: a text file via a temporary file, fsync and rename.
- ``check_output``: an output path that is an input of the command, or that exists without ``--force``,
  is refused before any work.

No pickle anywhere: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors

from ubsmoe.config import ConfigError

DIGESTS = "sha256"  # the metadata key of the digests (a JSON object: tensor name -> hex digest, and METADATA's)
METADATA = "@metadata"  # the digests' entry for the other metadata (no tensor may bear this name)


class DamagedFileError(ConfigError):
    """A file ubsmoe wrote whose bytes are no longer what was written (truncated, flipped bytes, not a
    safetensors file): reported, never trusted."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes in memory order: a header edited to another dtype or
    shape of the same size changes it too."""
    flat = tensor.detach().contiguous().reshape(-1)
    digest = hashlib.sha256(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


def metadata_digest(metadata: dict[str, str]) -> str:
    """SHA-256 of the metadata's entries (sorted JSON): the round, the scalars, the config beside the tensors."""
    return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                  before_rename=None, single_writer: bool = True) -> Path:
    """``tensors`` (moved to the CPU) with ``metadata`` and their digests, written whole or not at all:
    temporary file, fsync, rename, fsync of the folder. ``before_rename()``, if given, runs once the
    temporary file is complete (the crash tests kill the process there). A ``single_writer`` also removes
    temporary files that killed processes left; where several processes may write the same file at once
    (Flower's ClientApps), theirs are left alone."""
    tensors = {name: value.detach().to("cpu").contiguous() for name, value in tensors.items()}
    digests = {name: tensor_digest(value) for name, value in tensors.items()}
    digests[METADATA] = metadata_digest(dict(metadata or {}))
    data = save_tensors(tensors, metadata=dict(metadata or {}) | {DIGESTS: json.dumps(digests, sort_keys=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{os.getpid()}.partial"
    with temporary.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(temporary, path)
    if single_writer:
        for stale in path.parent.glob(f".{path.name}.*.partial"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
    fsync_folder(path.parent)
    return path


def read_tensors(path: Path, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file ``write_tensors`` wrote, every tensor checked against its digest.

    A file that is not a safetensors file, lacks digests or whose bytes changed raises ``DamagedFileError``
    naming the file, what is wrong, and ``fix`` (what the user can do about it)."""
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except OSError as error:  # not a question of its bytes: the file cannot be opened
        raise ConfigError(f"{path} cannot be read ({error.strerror or error}): check that it exists and that you "
                          "may read it") from None
    except (SafetensorError, ValueError, UnicodeDecodeError) as error:
        raise DamagedFileError(f"{path} is damaged (not a readable safetensors file: {error}): {fix}") from None
    if DIGESTS not in metadata:
        raise DamagedFileError(f"{path} holds no tensor digests (written by an earlier ubsmoe, or not by ubsmoe), "
                               f"so its numbers cannot be verified: {fix}")
    try:
        digests = json.loads(metadata.pop(DIGESTS))
    except ValueError:
        raise DamagedFileError(f"{path} is damaged (its digests are not JSON): {fix}") from None
    if not isinstance(digests, dict) or set(digests) != set(tensors) | {METADATA}:
        raise DamagedFileError(f"{path} is damaged (its digests do not list its tensors): {fix}")
    if digests[METADATA] != metadata_digest(metadata):
        raise DamagedFileError(f"{path} is damaged: its metadata (round, scalars, config) differs from what was "
                               f"written (SHA-256 mismatch): {fix}")
    changed = sorted(name for name, value in tensors.items() if tensor_digest(value) != digests[name])
    if changed:
        named = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise DamagedFileError(f"{path} is damaged: the bytes of {named} differ from those written "
                               f"(SHA-256 mismatch): {fix}")
    return tensors, metadata


def write_atomically(path: Path, text: str) -> None:
    """A text file written whole or not at all: temporary file, fsync, rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _same_or_inside(path: Path, other: Path) -> bool:
    """Whether ``path`` is ``other`` or lies inside it (``other`` a folder), after resolving links."""
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents


def check_output(option: str, path: Path, inputs: Iterable[tuple[str, Path]], force: bool) -> None:
    """Before any work: ``path`` (given as ``option``) must not be, or lie inside, an input of the command
    (``inputs``: (its option, its path)), must not exist unless ``force``, and its folder must be
    writable. Every failure is a ``ConfigError`` naming the fix."""
    for name, source in inputs:
        if _same_or_inside(path, source) or (source.is_file() and path.exists() and path.samefile(source)):
            raise ConfigError(f"{option} {path} is {'' if path.resolve() == source.resolve() else 'inside '}"
                              f"{name} {source}, which this command reads: write the output elsewhere")
    if path.is_dir():
        raise ConfigError(f"{option} {path} is a folder: give a file path")
    if path.exists() and not force:
        raise ConfigError(f"{option} {path} exists: choose another path, or pass --force to replace it")
    check_writable_folder(option, path.parent)


def check_writable_folder(option: str, folder: Path) -> None:
    """``folder`` exists (or can be made) and takes a file; else a ``ConfigError`` naming why."""
    for above in (folder, *folder.parents):
        if above.exists():
            if not above.is_dir():
                raise ConfigError(f"cannot write {option} under {folder}: {above} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".ubsmoe-write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write {option} into {folder} ({error.strerror}): choose a place you can write") from None
