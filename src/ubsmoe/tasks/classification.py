"""Text classification: a pooled sequence representation, a linear head, cross-entropy, accuracy.

Data: BBC News or a user's CSV/JSONL file (``data.dataset``), deduplicated and split by
``data.split_seed``; clients are partitioned by class label. Encoders pool the mean of the real
tokens, decoders the last real token.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.config import ConfigError
from ubsmoe.data.dataset import Batch, TokenizedDataset, tokenize
from ubsmoe.data.sources import load_train_test
from ubsmoe.model import HeadFactory, MoEModel, TaskHead
from ubsmoe.model.backbones import BackboneFamily
from ubsmoe.tasks.base import Evaluation, ForwardObserver, Task, TaskData, register


class ClassificationHead(TaskHead):
    """Pooling and a linear layer: hidden (B, S, d), mask (B, S) -> logits (B, num_labels)."""

    def __init__(self, hidden_size: int, num_labels: int, pooling: str, generator: torch.Generator):
        super().__init__()
        self.pooling = pooling
        self.linear = nn.Linear(hidden_size, num_labels)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(num_labels, hidden_size, generator=generator) * 0.02)
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.linear(self.pool(hidden.to(self.linear.weight.dtype), mask))  # bf16 hidden states: pooled in float32

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden: (B, S, d), mask: (B, S) -> (B, d): masked mean (encoders) or last real token (decoders)."""
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        last = mask.long().cumsum(1).argmax(1)  # index of the last real token, right or left padding
        return hidden[torch.arange(hidden.shape[0]), last]

    def flops(self, attention_mask: torch.Tensor, training: bool, **inputs) -> float:
        """One (d x C) product per sequence; in training its weight and input gradients too."""
        return 2 * attention_mask.shape[0] * self.linear.in_features * self.linear.out_features * (1 + 2 * training)


def classification_head(num_labels: int) -> HeadFactory:
    def build(backbone: nn.Module, family: BackboneFamily, generator: torch.Generator) -> ClassificationHead:
        return ClassificationHead(backbone.config.hidden_size, num_labels, family.pooling, generator)

    return build


@register
class Classification(Task):
    name = "classification"
    description = "text classification: pooled representation, linear head, cross-entropy; accuracy per tier"

    def load(self, tokenizer) -> TaskData:
        data, model = self.config.data, self.config.model
        texts = load_train_test(data.dataset, data.split_seed, data.test_fraction, data.test_file, data.text_column,
                                data.label_column, data.max_train_samples, data.max_test_samples,
                                data.dedup_prefix_words, data.header)
        return TaskData(tokenize(texts.train, tokenizer, model.max_length), tokenize(texts.test, tokenizer, model.max_length),
                        list(texts.train.labels), list(texts.train.label_names), texts.duplicates_removed)

    def head(self, data: TaskData) -> HeadFactory:
        return classification_head(len(data.key_names))

    def loss(self, model: MoEModel, batch: Batch) -> torch.Tensor:
        logits = model(batch.input_ids, batch.attention_mask)
        return F.cross_entropy(logits, batch.labels.to(logits.device))

    @torch.inference_mode()
    def evaluate(self, model: MoEModel, data: TokenizedDataset, batch_size: int,
                 observe: ForwardObserver | None = None) -> Evaluation:
        correct, loss_sum = 0, 0.0
        for input_ids, attention_mask, labels in data.batches(batch_size):
            logits = model(input_ids, attention_mask).cpu()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
            if observe is not None:
                observe(attention_mask)
        return Evaluation(accuracy=correct / len(data), loss=loss_sum / len(data))

    def check_records(self, records: list[dict], source: Path, key_names: list[str]) -> None:
        """Every record needs a non-empty ``text``."""
        if not any("text" in r for r in records):
            raise ConfigError(f"--input {source} has no column 'text'; its columns are {sorted(records[0])}: rename "
                              "the column that holds the texts to 'text'")
        missing = [n for n, r in enumerate(records, 1) if not str(r.get("text") or "").strip()]
        if missing:
            raise ConfigError(f"{len(missing)} input records have no 'text' (records {missing[:5]}): give every "
                              "record its text")

    @torch.inference_mode()
    def predict(self, model: MoEModel, records: list[dict], key_names: list[str], batch_size: int) -> list[dict]:
        """The likeliest label and every label's probability, per text."""
        from ubsmoe.model import load_tokenizer

        tokenizer = load_tokenizer(self.config.model.backbone)
        tokenizer.padding_side = "right"
        texts = [str(r["text"]) for r in records]
        out = []
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                max_length=self.config.model.max_length, return_tensors="pt")
            probs = torch.softmax(model(encoded["input_ids"], encoded["attention_mask"]).float().cpu(), -1)
            for text, row in zip(texts[start:start + batch_size], probs):
                out.append({"text": text, "label": key_names[int(row.argmax())],
                            "probabilities": {name: float(p) for name, p in zip(key_names, row)}})
        return out

    def labelled(self, path: Path, key_names: list[str]) -> TokenizedDataset:
        from ubsmoe.data.text_files import load_text_file
        from ubsmoe.model import load_tokenizer

        data = self.config.data
        if path.is_dir():
            raise ConfigError(f"--data {path} is a folder: a classification run is evaluated on one labelled data file "
                              f"(.csv, .tsv, .jsonl, .json or .parquet) with the columns {data.text_column!r} and "
                              f"{data.label_column!r}")
        dataset = load_text_file(path, data.text_column, data.label_column, label_names=key_names, header=data.header)
        return tokenize(dataset, load_tokenizer(self.config.model.backbone), self.config.model.max_length)
