"""A tiny learnable text-classification task and the config overrides that run it on a tiny backbone."""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "business": "bank rates market shares profit economy growth sales".split(),
    "entertainment": "film music award star show".split(),
    "sport": "game match team goal win cup".split(),
}


def write_tiny_task(folder: Path) -> Path:
    """A learnable three-topic JSONL file of 120 rows: each text mixes topic words with filler words."""
    rng = random.Random(0)
    filler = "the a of to in and is was".split()
    rows = []
    for i in range(120):
        label = list(TOPICS)[i % 3]
        words = [rng.choice(TOPICS[label]) for _ in range(4)] + [rng.choice(filler) for _ in range(4)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    path = folder / "topics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def tiny_overrides(tiny_bert, tiny_task, **extra) -> list[str]:
    """``key=value`` overrides: 4 experts, rank 4, 2 clients in tiers 0.5 and 1.0, 2 rounds of 3 steps."""
    settings = {
        "model.backbone": tiny_bert, "model.num_experts": 4, "model.lora_rank": 4, "model.max_length": 16,
        "model.calibration_samples": 16, "data.dataset": tiny_task, "federation.num_clients": 2,
        "federation.budgets": "0.5,1.0", "federation.rounds": 2, "train.local_steps": 3, "train.batch_size": 8,
        "train.lr": 0.01,
    } | extra
    return [f"{k}={v}" for k, v in settings.items()]
