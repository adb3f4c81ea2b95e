"""Causal-LM fine-tuning on the commonsense suite, scored per task by log-likelihood and by generation.

Data: ``data.dataset = "commonsense:PATH"``, a folder in the LLM-Adapters format (``data.commonsense``).
Clients train on a seeded mix of the train sets (``data.max_train_samples``) and are partitioned by
source task; every tier is scored on a seeded subset of each task's test set (``data.max_test_samples``
per task). The head is the backbone's own language-model head, frozen (the embedding matrix when the
checkpoint ties them); its vocabulary projection runs only at the positions that are scored.

Sequences are the prompt's tokens, then the response's (tokenised apart, so that training, scoring and
generation see the same tokens) and, in training, end-of-sequence. A prompt too long for
``model.max_length`` loses tokens from its left (after the first, beginning-of-sequence token), never
the response. The training loss covers the response's tokens (``train.train_on_inputs`` adds the
prompt's). Evaluation, per task:
- log-likelihood: the sum of log-probabilities of each choice's response ("the correct answer is
  answer2"); ``loglik`` is the share of questions whose right choice is the likeliest, ``loglik_norm``
  the same with sums divided by the response's length in characters;
- generation: greedy decoding with a key-value cache, at most ``evaluation.max_new_tokens`` tokens,
  read with LLM-Adapters' rules (the first match of the task's answer pattern; none counts as wrong).
``evaluation.protocol`` names the headline accuracy; the loss is the mean negative log-likelihood per
token of the right response.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ubsmoe.config import ConfigError
from ubsmoe.data.commonsense import CommonsenseExample, evaluation_subsets, extract_answer, load_commonsense, training_mix
from ubsmoe.data.dataset import Batch, TokenizedDataset
from ubsmoe.model import HeadFactory, MoEModel, TaskHead
from ubsmoe.model.backbones import BackboneFamily, resolve_backbone
from ubsmoe.tasks.base import Evaluation, ForwardObserver, Task, TaskData, register

IGNORE = -100  # the label of a position that carries no loss
DATASET_PREFIX = "commonsense:"


class LanguageModelHead(TaskHead):
    """The frozen vocabulary projection, run at chosen positions only: hidden (B, S, d), positions (B, S)
    bool -> logits (n, V) for the n chosen positions, in row-major order."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach(), persistent=False)  # (V, d); shares the embedding if tied
        self.last_positions = 0

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        chosen = hidden[mask if positions is None else positions]  # (n, d)
        self.last_positions = chosen.shape[0]
        return F.linear(chosen, self.weight)

    def flops(self, attention_mask: torch.Tensor, training: bool, **inputs) -> float:
        """The projection at the positions of the last forward; a frozen matrix: in training its input
        gradient only."""
        vocab, width = self.weight.shape
        return 2.0 * self.last_positions * width * vocab * (1 + training)


def language_model_head(backbone_name: str) -> HeadFactory:
    """The checkpoint's LM head: the input embedding when tied, else ``lm_head.weight`` read alone from the
    checkpoint's safetensors files (nothing else is loaded twice)."""

    def build(backbone: nn.Module, family: BackboneFamily, generator: torch.Generator) -> LanguageModelHead:
        if getattr(backbone.config, "tie_word_embeddings", False):
            return LanguageModelHead(backbone.get_input_embeddings().weight)
        return LanguageModelHead(_read_lm_head(backbone_name))

    return build


def _read_lm_head(backbone_name: str) -> torch.Tensor:
    from safetensors import safe_open

    source = resolve_backbone(backbone_name)
    if source.gguf_file:
        raise ConfigError(f"{source.gguf_file} has an untied output layer, which ubsmoe reads only from "
                          "safetensors checkpoints: convert it to a Hugging Face folder")
    index = source.folder / "model.safetensors.index.json"
    if index.is_file():
        files = [source.folder / json.loads(index.read_text())["weight_map"].get("lm_head.weight", "")]
    else:
        files = sorted(source.folder.glob("*.safetensors"))
    for file in files:
        if file.is_file():
            with safe_open(str(file), framework="pt") as handle:
                if "lm_head.weight" in handle.keys():
                    return handle.get_tensor("lm_head.weight").float()
    raise ConfigError(f"{source.folder} holds no lm_head.weight and its config does not tie it to the embeddings: "
                      "causal-lm needs the checkpoint's language-model head")


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


def suite_path(dataset: str) -> Path:
    if not dataset.startswith(DATASET_PREFIX):
        raise ConfigError(f"task causal-lm reads data.dataset=commonsense:PATH (a folder of tasks in the LLM-Adapters "
                          f"format), got {dataset!r}")
    return Path(dataset[len(DATASET_PREFIX):]).expanduser()


def _token_ids(tokenizer, text: str, special: bool) -> list[int]:
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
        prompt = _token_ids(tokenizer, example.prompt, special=True)
        response = _token_ids(tokenizer, example.response(), special=False) + [tokenizer.eos_token_id]
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
            responses = [_token_ids(tokenizer, example.response(c), special=False) for c in example.choices]
            room = max_length - max(max(len(r) for r in responses), max_new_tokens)
            if room < 2:
                raise ConfigError(f"model.max_length={max_length} leaves no room for a {task} prompt next to "
                                  f"{max_new_tokens} generated tokens: raise model.max_length")
            prompt = fit_prompt(_token_ids(tokenizer, example.prompt, special=True), room, tokenizer.bos_token_id)
            encoded.append(ScoredQuestion(task, prompt, responses, [len(example.response(c)) for c in example.choices],
                                          example.choices, example.choices.index(example.answer)))
        questions[task] = encoded
    return CommonsenseTestSet(questions)


def next_token_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (B, S) -> (positions (B, S) bool: where the next token carries loss, targets (n,))."""
    carries = labels[:, 1:] != IGNORE
    positions = F.pad(carries, (0, 1), value=False)
    return positions, labels[:, 1:][carries]


@register
class CausalLM(Task):
    name = "causal-lm"
    description = "causal-LM fine-tuning on the commonsense suite; accuracy per task by generation and log-likelihood"

    def load(self, tokenizer) -> TaskData:
        data, model = self.config.data, self.config.model
        suite = load_commonsense(suite_path(data.dataset))
        mix, removed = training_mix(suite, data.max_train_samples, data.split_seed)
        tasks = sorted({e.task for e in mix})
        train = encode_training(tokenizer, mix, model.max_length, self.config.train.train_on_inputs)
        test = encode_questions(tokenizer, evaluation_subsets(suite, data.max_test_samples, data.split_seed),
                                model.max_length, self.config.evaluation.max_new_tokens)
        self.tokenizer = tokenizer
        return TaskData(train, test, [tasks.index(e.task) for e in mix], tasks, removed)

    def head(self, data: TaskData) -> HeadFactory:
        return language_model_head(self.config.model.backbone)

    def loss(self, model: MoEModel, batch: Batch) -> torch.Tensor:
        positions, targets = next_token_positions(batch.labels)
        return F.cross_entropy(model(batch.input_ids, batch.attention_mask, positions=positions), targets)

    @torch.inference_mode()
    def evaluate(self, model: MoEModel, data: CommonsenseTestSet, batch_size: int,
                 observe: ForwardObserver | None = None) -> Evaluation:
        details: dict[str, float] = {}
        nll, tokens = 0.0, 0
        for task, questions in data.questions.items():
            scores = choice_log_likelihoods(model, questions, batch_size, observe, desc=f"{task}: log-likelihood")
            right = [s[q.answer] for s, q in zip(scores, questions)]
            nll -= sum(right)
            tokens += sum(len(q.responses[q.answer]) for q in questions)
            details[f"{task}/loglik"] = statistics.mean(
                float(max(range(len(s)), key=lambda i: s[i]) == q.answer) for s, q in zip(scores, questions))
            details[f"{task}/loglik_norm"] = statistics.mean(
                float(max(range(len(s)), key=lambda i: s[i] / q.response_chars[i]) == q.answer)
                for s, q in zip(scores, questions))
            generated = generate(model, [q.prompt for q in questions], self.config.evaluation.max_new_tokens,
                                 self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, batch_size,
                                 desc=f"{task}: generation")
            texts = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
            details[f"{task}/generation"] = statistics.mean(
                float(extract_answer(task, text) == q.choices[q.answer]) for text, q in zip(texts, questions))
            details[f"{task}/chance"] = data.chance(task)
        for metric in ("loglik", "loglik_norm", "generation", "chance"):
            details[metric] = statistics.mean(details[f"{task}/{metric}"] for task in data.questions)
        return Evaluation(accuracy=details[self.config.evaluation.protocol], loss=nll / max(tokens, 1), details=details)


@torch.inference_mode()
def choice_log_likelihoods(model: MoEModel, questions: list[ScoredQuestion], batch_size: int,
                           observe: ForwardObserver | None = None, desc: str = "") -> list[list[float]]:
    """Per question, per choice: the sum of log-probabilities of the choice's response tokens after the
    prompt. Sequences (prompt + response) run ``batch_size`` at a time, right-padded."""
    sequences = [(qi, ci, q.prompt, r) for qi, q in enumerate(questions) for ci, r in enumerate(q.responses)]
    scores = [[0.0] * len(q.responses) for q in questions]
    pad = 0
    for start in tqdm(range(0, len(sequences), batch_size), desc=desc, leave=False, disable=None):
        chunk = sequences[start:start + batch_size]
        length = max(len(p) + len(r) for _, _, p, r in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        labels = torch.full((len(chunk), length), IGNORE, dtype=torch.long)
        for row, (_, _, prompt, response) in enumerate(chunk):
            ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
            mask[row, : len(prompt) + len(response)] = 1
            labels[row, len(prompt): len(prompt) + len(response)] = torch.tensor(response)
        positions, targets = next_token_positions(labels)
        logits = model(ids, mask, positions=positions)  # (n, V), rows in (sequence, position) order
        if observe is not None:
            observe(mask)
        token_scores = logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        per_sequence = torch.zeros(len(chunk), dtype=token_scores.dtype).index_add_(
            0, positions.nonzero()[:, 0], token_scores)
        for row, (qi, ci, _, _) in enumerate(chunk):
            scores[qi][ci] = float(per_sequence[row])
    return scores


@torch.inference_mode()
def generate(model: MoEModel, prompts: list[list[int]], max_new_tokens: int, eos: int, pad: int, batch_size: int,
             desc: str = "") -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids), ``batch_size`` at a time, left-padded, with the
    backbone's key-value cache; each stops at end-of-sequence (included) or after ``max_new_tokens``."""
    from transformers import DynamicCache

    results: list[list[int]] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False, disable=None):
        chunk = prompts[start:start + batch_size]
        length = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, length - len(prompt):] = torch.tensor(prompt)
            mask[row, length - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        output = model.run_backbone(ids, mask, position_ids=positions, use_cache=True,
                                    cache=DynamicCache(config=model.backbone.config))
        new = torch.empty((len(chunk), 0), dtype=torch.long)
        done = torch.zeros(len(chunk), dtype=torch.bool)
        for _ in range(max_new_tokens):
            hidden = output.last_hidden_state[:, -1:]  # (B, 1, d)
            token = model.head(hidden, torch.ones_like(hidden[..., 0], dtype=torch.bool)).argmax(-1)  # (B,)
            token = torch.where(done, torch.full_like(token, pad), token)
            new = torch.cat([new, token.unsqueeze(1)], dim=1)
            done |= token == eos
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((len(chunk), 1), dtype=torch.long)], dim=1)
            positions = positions[:, -1:] + 1
            output = model.run_backbone(token.unsqueeze(1), mask, position_ids=positions, use_cache=True,
                                        cache=output.cache)
        for row in range(len(chunk)):
            tokens = new[row].tolist()
            results.append(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
    return results
