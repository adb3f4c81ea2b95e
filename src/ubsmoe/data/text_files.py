"""Users' own text classification files: CSV, TSV, JSONL, a JSON list or Parquet, with a text column and
a label column.

Labels may be strings or integers; they are numbered in sorted order of their values. Files are read
as UTF-8 (a byte-order mark is allowed); rows without a label or with an empty text, and training files
with a single class, are refused with the rows named.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ubsmoe.config import ConfigError, MissingFileError, MissingPackageError
from ubsmoe.data.dataset import TextDataset


def read_records(path: Path, header: bool = True) -> list[dict]:
    """The file's rows as dictionaries by column name (without a header row, by column number "0", "1", ...)."""
    try:
        return _read(path, header)
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 ({error.reason}); convert it, e.g. "
                          f"`iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}`") from None
    except csv.Error as error:
        raise ConfigError(f"{path} is not a well-formed {path.suffix[1:].upper()} file ({error})") from None


def _read(path: Path, header: bool) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        csv.field_size_limit(2**31 - 1)  # long texts are fine: tokenising truncates them to model.max_length
        delimiter = "\t" if suffix == ".tsv" else ","
        with path.open(newline="", encoding="utf-8-sig") as handle:
            if header:
                return list(csv.DictReader(handle, delimiter=delimiter))
            return [{str(i): cell for i, cell in enumerate(row)} for row in csv.reader(handle, delimiter=delimiter) if row]
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".json" and path.read_text(encoding="utf-8-sig").lstrip().startswith("["):
        try:
            records = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
        if not all(isinstance(r, dict) for r in records):
            raise ConfigError(f"{path} must hold a JSON list of objects (one per record)")
        return records
    if suffix in (".jsonl", ".json"):
        records = []
        with path.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as error:
                        raise ConfigError(f"{path}:{number} is not valid JSON ({error.msg}); "
                                         "expected one JSON object per line") from None
        return records
    raise ConfigError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .jsonl, .json or .parquet")


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise MissingPackageError(f"reading {path.name} needs pyarrow: pip install pyarrow") from None
    import pyarrow

    try:
        return parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowInvalid, OSError) as error:
        raise ConfigError(f"{path} is not a readable Parquet file ({error})") from None


def load_text_file(path: str | Path, text_column: str = "text", label_column: str = "label",
                   label_names: list[str] | None = None, header: bool = True) -> TextDataset:
    """Read texts and labels; ``label_names`` fixes the numbering (pass the training set's for a test file).
    Without a header row, the columns are numbers; the default names mean label 0, text 1."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"data file {path} does not exist")
    if not header and path.suffix.lower() in (".csv", ".tsv"):
        text_column = "1" if text_column == "text" else text_column
        label_column = "0" if label_column == "label" else label_column
        if not (text_column.isdigit() and label_column.isdigit()):
            raise ConfigError(f"data.header=false numbers the columns of {path.name} from 0: set data.text_column and "
                              f"data.label_column to numbers, got {text_column!r} and {label_column!r}")
    records = read_records(path, header or path.suffix.lower() not in (".csv", ".tsv"))
    if not records:
        raise ConfigError(f"{path} holds no records")
    for column in (text_column, label_column):
        if column not in records[0]:
            raise ConfigError(f"{path} has no column {column!r}; its columns are {sorted(records[0])}: name the text "
                              "and label columns with data.text_column and data.label_column (`ubsmoe evaluate`: "
                              "--text-column and --label-column)")
    unlabelled = [n for n, r in enumerate(records, 1) if r.get(label_column) in (None, "")]
    if unlabelled:
        raise ConfigError(f"{path}: {len(unlabelled)} rows have no {label_column!r} (data rows {unlabelled[:5]}): "
                          "label them or remove them")
    empty = [n for n, r in enumerate(records, 1) if not str(r.get(text_column) or "").strip()]
    if empty:
        raise ConfigError(f"{path}: {len(empty)} rows have an empty {text_column!r} (data rows {empty[:5]}): "
                          "fill them or remove them")
    raw_labels = [str(r[label_column]) for r in records]
    if label_names is None and len(set(raw_labels)) < 2:
        raise ConfigError(f"{path} holds a single class ({raw_labels[0]!r}): a classifier needs at least two")
    if label_names is None:
        values = sorted(set(raw_labels), key=lambda v: (not v.lstrip("-").isdigit(), int(v) if v.lstrip("-").isdigit() else 0, v))
        label_names = values
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted(set(raw_labels) - set(index))
    if unknown:
        raise ConfigError(f"{path} has labels {unknown[:5]} not among the training labels {label_names}")
    return TextDataset([str(r[text_column]) for r in records], [index[v] for v in raw_labels], list(label_names))
