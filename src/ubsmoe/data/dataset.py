"""Text classification data in memory, its tokenised form, and stratified train/test splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ubsmoe.config import ConfigError


@dataclass
class TextDataset:
    """Texts with integer labels; ``label_names[i]`` names label i."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))[:5]} are outside [0, {len(self.label_names)})")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def subset(self, indices) -> "TextDataset":
        indices = [int(i) for i in indices]
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)


def duplicate_key(text: str, prefix_words: int) -> str:
    """What two texts must share to count as duplicates: their case-folded words, or the first
    ``prefix_words`` of them (0: all). Texts that agree on the words a truncating model reads are the
    same input to it."""
    words = text.casefold().split()
    return " ".join(words[:prefix_words] if prefix_words > 0 else words)


def drop_duplicates(dataset: TextDataset, prefix_words: int = 0,
                    seen: set[str] | None = None) -> tuple[TextDataset, int]:
    """Keep the first of every group of duplicates (``duplicate_key``), and drop texts whose key is in
    ``seen`` -> (deduplicated dataset, number removed)."""
    seen = set(seen or ())
    keep = []
    for index, text in enumerate(dataset.texts):
        key = duplicate_key(text, prefix_words)
        if key not in seen:
            seen.add(key)
            keep.append(index)
    return dataset.subset(keep), len(dataset) - len(keep)


def stratified_split(dataset: TextDataset, test_fraction: float, seed: int) -> tuple[TextDataset, TextDataset]:
    """Split each label's samples by ``test_fraction`` with a fixed seed -> (train, test)."""
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(dataset.labels)
    train, test = [], []
    for label in range(dataset.num_labels):
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        cut = int(round(len(members) * test_fraction))
        test += members[:cut].tolist()
        train += members[cut:].tolist()
    return dataset.subset(sorted(train)), dataset.subset(sorted(test))


class Batch(NamedTuple):
    """Rows of a ``TokenizedDataset``: input_ids, attention_mask (B, S); labels as the task defines them
    ((B,) class labels, or (B, S) target tokens)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


@dataclass
class TokenizedDataset:
    """Token ids padded to one length. input_ids, attention_mask: (N, S); labels: (N, ...) as the task
    defines them ((N,) class labels for classification)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, indices: torch.Tensor) -> Batch:
        """Rows ``indices``, trimmed to the longest real sequence among them (right padding)."""
        mask = self.attention_mask[indices]
        length = int(mask.sum(1).max())
        labels = self.labels[indices]
        return Batch(self.input_ids[indices, :length], mask[:, :length],
                     labels[:, :length] if labels.dim() == 2 else labels)

    def batches(self, batch_size: int, indices: torch.Tensor | None = None):
        """Consecutive batches over ``indices`` (all rows by default), in order."""
        indices = torch.arange(len(self)) if indices is None else indices
        for start in range(0, len(indices), batch_size):
            yield self.batch(indices[start : start + batch_size])


def tokenize(dataset: TextDataset, tokenizer, max_length: int) -> TokenizedDataset:
    """Tokenise every text to at most ``max_length`` tokens (right padding)."""
    if max_length < 2:
        raise ConfigError(f"model.max_length must be >= 2, got {max_length}")
    tokenizer.padding_side = "right"
    encoded = tokenizer(dataset.texts, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
    return TokenizedDataset(encoded["input_ids"], encoded["attention_mask"], torch.tensor(dataset.labels))
