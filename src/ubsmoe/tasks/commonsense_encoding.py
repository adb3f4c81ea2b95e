"""Tokenising the commonsense suite for causal-LM fine-tuning: training sequences with the labels that carry
loss, and test questions as a prompt and each choice's response."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ubsmoe.config import ConfigError
from ubsmoe.data.commonsense import CommonsenseExample
from ubsmoe.data.dataset import TokenizedDataset

IGNORE = -100  # the label of a position that carries no loss


@dataclass
class ScoredQuestion:
    """A test question as token ids: the prompt, each choice's response, and which choice is right."""

    task: str
    prompt: list[int]
    responses: list[list[int]]
    response_chars: list[int]
    choices: list[str]
    answer: int


@dataclass
class CommonsenseTestSet:
    """Every task's scored questions, and the task's chance level (the mean of 1 / number of choices)."""

    questions: dict[str, list[ScoredQuestion]]

    def __len__(self) -> int:
        return sum(len(q) for q in self.questions.values())

    def chance(self, task: str) -> float:
        return statistics.mean(1 / len(q.choices) for q in self.questions[task])

    def majority(self, task: str) -> float:
        """The accuracy of always giving the task's most common right answer (the best constant answer)."""
        answers = Counter(q.choices[q.answer] for q in self.questions[task])
        return answers.most_common(1)[0][1] / len(self.questions[task])



def token_ids(tokenizer, text: str, special: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=special)["input_ids"]


def fit_prompt(prompt: list[int], room: int, bos: int | None) -> list[int]:
    """The prompt's last tokens that fit in ``room``, keeping a first beginning-of-sequence token ``bos``."""
    if len(prompt) <= room:
        return prompt
    if prompt and prompt[0] == bos:
        return prompt[:1] + prompt[len(prompt) - room + 1:]
    return prompt[len(prompt) - room:]


def encode_training(tokenizer, examples: list[CommonsenseExample], max_length: int,
                    train_on_inputs: bool) -> TokenizedDataset:
    """Prompt + response + end-of-sequence per example, right-padded to ``max_length``; labels (N, S) hold
    the token ids that carry loss and IGNORE elsewhere."""
    rows, labels = [], []
    for example in examples:
        prompt = token_ids(tokenizer, example.prompt, special=True)
        response = token_ids(tokenizer, example.response(), special=False) + [tokenizer.eos_token_id]
        if len(response) >= max_length:
            raise ConfigError(f"a {example.task} response takes {len(response)} tokens, more than model.max_length="
                              f"{max_length} leaves for a prompt: raise model.max_length")
        prompt = fit_prompt(prompt, max_length - len(response), tokenizer.bos_token_id)
        rows.append(prompt + response)
        labels.append((prompt if train_on_inputs else [IGNORE] * len(prompt)) + response)
    ids = torch.full((len(rows), max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), max_length), dtype=torch.long)
    targets = torch.full((len(rows), max_length), IGNORE, dtype=torch.long)
    for i, (row, label) in enumerate(zip(rows, labels)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        targets[i, : len(label)] = torch.tensor(label)
    return TokenizedDataset(ids, mask, targets)


def encode_questions(tokenizer, subsets: dict[str, list[CommonsenseExample]], max_length: int,
                     max_new_tokens: int) -> CommonsenseTestSet:
    """Every test question's prompt (left-truncated so that it and the longest response, or the generated
    tokens, fit in ``max_length``) and its choices' responses."""
    questions = {}
    for task, examples in subsets.items():
        encoded = []
        for example in examples:
            responses = [token_ids(tokenizer, example.response(c), special=False) for c in example.choices]
            room = max_length - max(max(len(r) for r in responses), max_new_tokens)
            if room < 2:
                raise ConfigError(f"model.max_length={max_length} leaves no room for a {task} prompt next to "
                                  f"{max_new_tokens} generated tokens: raise model.max_length")
            prompt = fit_prompt(token_ids(tokenizer, example.prompt, special=True), room, tokenizer.bos_token_id)
            encoded.append(ScoredQuestion(task, prompt, responses, [len(example.response(c)) for c in example.choices],
                                          example.choices, example.choices.index(example.answer)))
        questions[task] = encoded
    return CommonsenseTestSet(questions)


def next_token_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, S) -> (positions (B, S) bool: where the next token carries loss, targets (n,))."""
    carries = labels[:, 1:] != IGNORE
    positions = F.pad(carries, (0, 1), value=False)
    return positions, labels[:, 1:][carries]
