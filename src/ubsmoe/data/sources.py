"""Which dataset an experiment uses: BBC News or a user's file, split into train and test."""

from __future__ import annotations

from ubsmoe.data.bbc_news import load_bbc_news
from ubsmoe.data.dataset import TextDataset, stratified_split
from ubsmoe.data.text_files import load_text_file

BUILTIN_DATASETS = {"bbc_news": load_bbc_news}


def load_train_test(dataset: str, seed: int, test_fraction: float = 0.2, test_file: str = "",
                    text_column: str = "text", label_column: str = "label", max_train_samples: int = 0,
                    max_test_samples: int = 0) -> tuple[TextDataset, TextDataset]:
    """(train, test) for a built-in dataset name or a CSV/JSONL path; optional caps keep a stratified prefix."""
    if dataset in BUILTIN_DATASETS:
        full = BUILTIN_DATASETS[dataset]()
    elif dataset.endswith((".csv", ".jsonl", ".json")):
        full = load_text_file(dataset, text_column, label_column)
    else:
        raise ValueError(f"unknown dataset {dataset!r}: use one of {sorted(BUILTIN_DATASETS)} "
                         "or the path of a .csv/.jsonl file")
    if test_file:
        train = full
        test = load_text_file(test_file, text_column, label_column, label_names=full.label_names)
    else:
        train, test = stratified_split(full, test_fraction, seed)
    if max_train_samples:
        train = _cap(train, max_train_samples, seed)
    if max_test_samples:
        test = _cap(test, max_test_samples, seed + 1)
    return train, test


def _cap(dataset: TextDataset, limit: int, seed: int) -> TextDataset:
    if limit >= len(dataset):
        return dataset
    keep, _ = stratified_split(dataset, 1 - limit / len(dataset), seed)
    return keep
