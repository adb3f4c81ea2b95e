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


def record(question: str, answer: str, choices: str) -> dict:
    return {"instruction": f"Please choose the correct answer to question: {question} Answer format: {choices}",
            "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def write_tiny_suite(root: Path) -> Path:
    """Two tasks with train and test sets and one test-only task, in the LLM-Adapters layout."""
    words = ["market", "film", "goal", "vote", "phone", "court", "bank", "music", "team", "party"]
    tasks = {
        # questions differ by a number (an unknown token to the tiny tokenizer, but another text)
        "boolq": lambda i: record(f"is {words[i % 10]} true {i}", ["true", "false"][i % 2], "true/false"),
        "ARC-Easy": lambda i: record(f"which {words[i % 10]} {words[(i + 3) % 10]} {i}", f"answer{1 + i % 3}",
                                    "answer1/answer2/answer3"),
        "winogrande": lambda i: record(f"the {words[i % 10]} or the {words[(i + 1) % 10]} {i}", f"option{1 + i % 2}",
                                       "option1/option2"),
    }
    for task, make in tasks.items():
        (root / task).mkdir()
        (root / task / "test.json").write_text(json.dumps([make(i) for i in range(100, 112)]))
        if task != "winogrande":
            (root / task / "train.json").write_text(json.dumps([make(i) for i in range(40)]))
    return root


def causal_overrides(backbone, suite, **extra) -> list[str]:
    settings = {
        "task": "causal-lm", "model.backbone": backbone, "data.dataset": f"commonsense:{suite}",
        "model.num_experts": 4, "model.lora_rank": 4, "model.max_length": 64, "model.calibration_samples": 8,
        "data.max_train_samples": 48, "data.max_test_samples": 4, "federation.num_clients": 2,
        "federation.budgets": "0.5,1.0", "federation.rounds": 1, "train.local_steps": 2, "train.batch_size": 4,
        "train.lr": 0.01, "train.eval_batch_size": 8, "evaluation.max_new_tokens": 6,
    } | extra
    return [f"{k}={v}" for k, v in settings.items()]


def assert_every_client_answered(results) -> None:
    """Every round aggregated an update from every client it sampled: a left-out client would let a method
    that fails for one tier pass an end-to-end test."""
    federation = results.config["federation"]
    sampled = max(1, round(federation["fraction_fit"] * federation["num_clients"]))
    for entry in results.history:
        assert entry.failed_clients is None, entry.failed_clients
        assert len(entry.clients) == sampled, entry.clients
