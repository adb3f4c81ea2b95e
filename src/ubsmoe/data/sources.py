"""Which dataset an experiment uses: BBC News or a user's file, deduplicated and split into train and test.

The split depends on ``split_seed`` alone, never on the experiment's seed: every seed of a comparison
is scored on the same test texts, and no test text (nor a text that starts with the same words) is
in the training set.
"""

from __future__ import annotations

from dataclasses import dataclass

from ubsmoe.config import ConfigError
from ubsmoe.data.bbc_news import load_bbc_news
from ubsmoe.data.dataset import TextDataset, drop_duplicates, duplicate_key, stratified_split
from ubsmoe.data.text_files import load_text_file

BUILTIN_DATASETS = {"bbc_news": load_bbc_news}
DATA_FILE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


@dataclass
class TrainTest:
    """The texts an experiment trains and tests on, and how many duplicates were left out.

    duplicates_removed: texts dropped before splitting because an earlier text had the same words (or the
    same first ``dedup_prefix_words``); with a separate test file, training texts that duplicate an
    earlier training text or any test text (the test file is kept whole).
    """

    train: TextDataset
    test: TextDataset
    duplicates_removed: int


def load_train_test(dataset: str, split_seed: int = 0, test_fraction: float = 0.2, test_file: str = "",
                    text_column: str = "text", label_column: str = "label", max_train_samples: int = 0,
                    max_test_samples: int = 0, dedup_prefix_words: int = 40, header: bool = True) -> TrainTest:
    """Train and test texts for a built-in dataset name or a CSV/JSONL path, deduplicated; optional caps
    keep a stratified subset. Everything random here is drawn from ``split_seed``."""
    if dataset in BUILTIN_DATASETS:
        full = BUILTIN_DATASETS[dataset]()
    elif dataset.lower().endswith(DATA_FILE_SUFFIXES):
        full = load_text_file(dataset, text_column, label_column, header=header)
    else:
        raise ConfigError(f"unknown dataset {dataset!r}: use one of {sorted(BUILTIN_DATASETS)} "
                          "or the path of a .csv/.tsv/.jsonl/.json/.parquet file")
    if test_file:
        test = load_text_file(test_file, text_column, label_column, label_names=full.label_names, header=header)
        # A given test file is scored as it is; the training texts lose their duplicates and every text
        # that duplicates a test text.
        train, removed = drop_duplicates(full, dedup_prefix_words,
                                         seen={duplicate_key(t, dedup_prefix_words) for t in test.texts})
    else:
        unique, removed = drop_duplicates(full, dedup_prefix_words)
        train, test = stratified_split(unique, test_fraction, split_seed)
    if not len(test) or not len(train):
        raise ConfigError(f"the {'test' if not len(test) else 'training'} split of {dataset} came out empty "
                          f"({len(train)} training, {len(test)} test texts): add data or change data.test_fraction")
    if max_train_samples:
        train = _cap(train, max_train_samples, split_seed)
    if max_test_samples:
        test = _cap(test, max_test_samples, split_seed + 1)
    return TrainTest(train, test, removed)


def _cap(dataset: TextDataset, limit: int, seed: int) -> TextDataset:
    if limit >= len(dataset):
        return dataset
    keep, _ = stratified_split(dataset, 1 - limit / len(dataset), seed)
    return keep
