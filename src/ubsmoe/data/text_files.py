"""Users' own text classification files: CSV or JSONL with a text column and a label column.

Labels may be strings or integers; they are numbered in sorted order of their values.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ubsmoe.config import ConfigError, MissingFileError
from ubsmoe.data.dataset import TextDataset


def read_records(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    if suffix in (".jsonl", ".json"):
        records = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ConfigError(f"{path}:{number} is not valid JSON ({error.msg}); "
                                         "expected one JSON object per line") from None
        return records
    raise ConfigError(f"{path}: unsupported file type {suffix!r}; use .csv or .jsonl")


def load_text_file(path: str | Path, text_column: str = "text", label_column: str = "label",
                   label_names: list[str] | None = None) -> TextDataset:
    """Read texts and labels; ``label_names`` fixes the numbering (pass the training set's for a test file)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file {path} does not exist")
    records = read_records(path)
    if not records:
        raise ConfigError(f"{path} holds no records")
    for column in (text_column, label_column):
        if column not in records[0]:
            raise ConfigError(f"{path} has no column {column!r}; its columns are {sorted(records[0])}. "
                             f"Set data.text_column / data.label_column")
    raw_labels = [str(r[label_column]) for r in records]
    if label_names is None:
        values = sorted(set(raw_labels), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
        label_names = values
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(raw_labels) - set(index))
    if unknown:
        raise ConfigError(f"{path} has labels {unknown[:5]} not among the training labels {label_names}")
    return TextDataset([str(r[text_column]) for r in records], [index[v] for v in raw_labels], list(label_names))
