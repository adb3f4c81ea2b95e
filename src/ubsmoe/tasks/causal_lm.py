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
- generation: greedy decoding (or beam search, ``evaluation.num_beams``) with a key-value cache, at
  most ``evaluation.max_new_tokens`` tokens,
  read with LLM-Adapters' rules (the first match of the task's answer pattern; none counts as wrong).
``evaluation.protocol`` names the headline accuracy; the loss is the mean negative log-likelihood per
token of the right response.
"""

from __future__ import annotations

import json
import random
import re
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ubsmoe.config import ConfigError
from ubsmoe.data.commonsense import (ANSWER_TASKS, CommonsenseExample, evaluation_subsets, extract_answer, load_commonsense,
                                     read_task_file, training_mix)
from ubsmoe.data.dataset import Batch, TokenizedDataset
from ubsmoe.model import HeadFactory, MoEModel, TaskHead
from ubsmoe.model.backbones import BackboneFamily, resolve_backbone
from ubsmoe.tasks.base import Evaluation, ForwardObserver, Task, TaskData, register

IGNORE = -100  # the label of a position that carries no loss
DATASET_PREFIX = "commonsense:"


class LanguageModelHead(TaskHead):
    """The frozen vocabulary projection, run at chosen positions only: hidden (B, S, d), positions (B, S)
    bool -> logits (n, V) for the n chosen positions, in row-major order."""

    def __init__(self, weight: torch.Tensor | None = None, tied_to: nn.Embedding | None = None):
        super().__init__()
        if (weight is None) == (tied_to is None):
            raise ValueError("LanguageModelHead takes either its own weight or the embedding it is tied to")
        # Tied: the backbone owns the embedding, so it is no submodule here, and casting the model or moving it to
        # a device leaves one matrix (a buffer beside the parameter would become a second copy in either).
        self._tied = (tied_to,) if tied_to is not None else ()
        if weight is not None:
            self.register_buffer("own_weight", weight.detach(), persistent=False)  # (V, d)
        self.last_positions = 0

    @property
    def weight(self) -> torch.Tensor:
        """(V, d): the input embedding's matrix when tied (SmolLM2), else the checkpoint's ``lm_head.weight``."""
        return self._tied[0].weight if self._tied else self.own_weight

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        chosen = hidden[mask if positions is None else positions]  # (n, d)
        self.last_positions = chosen.shape[0]
        return F.linear(chosen.to(self.weight.dtype), self.weight).float()  # float32 logits in every precision

    def flops(self, attention_mask: torch.Tensor, training: bool, **inputs) -> float:
        """The projection at the positions of the last forward; a frozen matrix: in training its input
        gradient only."""
        vocab, width = self.weight.shape
        return 2.0 * self.last_positions * width * vocab * (1 + training)


def language_model_head(backbone_name: str) -> HeadFactory:
    """The checkpoint's LM head: the input embedding when tied, else ``lm_head.weight`` read alone from the
    checkpoint's safetensors files (nothing else is loaded twice)."""

    def build(backbone: nn.Module, family: BackboneFamily, generator: torch.Generator) -> LanguageModelHead:
        if family.pooling != "last":
            raise ConfigError(f"task causal-lm needs a decoder backbone (Llama family), got a {family.name} encoder: "
                              "set model.backbone=smollm2 or a local decoder checkpoint")
        if getattr(backbone.config, "tie_word_embeddings", False):
            return LanguageModelHead(tied_to=backbone.get_input_embeddings())
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

    def majority(self, task: str) -> float:
        """The accuracy of always giving the task's most common right answer (the best constant answer)."""
        answers = Counter(q.choices[q.answer] for q in self.questions[task])
        return answers.most_common(1)[0][1] / len(self.questions[task])


def generation_subset(count: int, cap: int, seed: str) -> list[int]:
    """The (ascending) indices of at most ``cap`` of ``count`` questions whose answers are generated, drawn
    from ``seed``; every one for ``cap`` 0."""
    if not cap or cap >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), cap))


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
    peft_task_type, peft_module_prefix = "CAUSAL_LM", "model."

    @classmethod
    def check(cls, config) -> None:
        suite_path(config.data.dataset)
        if config.evaluation.max_new_tokens < 1 or config.evaluation.num_beams < 1:
            raise ConfigError("evaluation.max_new_tokens and evaluation.num_beams must be >= 1")

    def load(self, tokenizer) -> TaskData:
        data, model = self.config.data, self.config.model
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"the tokenizer of {model.backbone} has no end-of-sequence token: task causal-lm needs a "
                              "decoder whose responses end")
        suite = load_commonsense(suite_path(data.dataset))
        mix, removed = training_mix(suite, data.max_train_samples, data.split_seed)
        if not mix:
            raise ConfigError(f"no training example is left in {data.dataset} once questions that a test set asks "
                              "are removed")
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
        logits = model(batch.input_ids, batch.attention_mask, positions=positions)
        return F.cross_entropy(logits, targets.to(logits.device))

    @torch.inference_mode()
    def evaluate(self, model: MoEModel, data: CommonsenseTestSet, batch_size: int,
                 observe: ForwardObserver | None = None) -> Evaluation:
        """Per task: log-likelihood accuracy (``loglik``, ``loglik_norm``) over every scored question; on the
        seeded subset whose answers are generated (``evaluation.generate_questions``), the generation accuracy
        and the format rate (the share of generations in which the task's answer pattern appears at all);
        the chance level and the majority baseline (the share of the most common right answer); the counts
        (``questions``, ``generated``) the standard errors are computed from. Then their means over tasks."""
        details: dict[str, float] = {}
        nll, tokens = 0.0, 0
        evaluation = self.config.evaluation
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        for task, questions in data.questions.items():
            chosen = generation_subset(len(questions), evaluation.generate_questions, f"{self.config.data.split_seed}/{task}")
            generated = set(chosen)
            rest = [i for i in range(len(questions)) if i not in generated]
            answers: list[Answer | None] = [None] * len(questions)
            for indices, new_tokens in ((chosen, evaluation.max_new_tokens), (rest, 0)):
                if indices:
                    for i, answer in zip(indices, score_and_generate(
                            model, [questions[i] for i in indices], batch_size, new_tokens, eos, pad, observe,
                            desc=task, num_beams=evaluation.num_beams)):
                        answers[i] = answer
            nll -= sum(a.scores[q.answer] for a, q in zip(answers, questions))
            tokens += sum(len(q.responses[q.answer]) for q in questions)
            texts = self.tokenizer.batch_decode([answers[i].generated for i in chosen], skip_special_tokens=True)
            read = [extract_answer(task, text) for text in texts]
            details[f"{task}/loglik"] = statistics.mean(float(a.likeliest(q) == q.answer) for a, q in zip(answers, questions))
            details[f"{task}/loglik_norm"] = statistics.mean(
                float(a.likeliest(q, per_char=True) == q.answer) for a, q in zip(answers, questions))
            details[f"{task}/generation"] = statistics.mean(
                float(r == questions[i].choices[questions[i].answer]) for r, i in zip(read, chosen))
            details[f"{task}/format"] = statistics.mean(float(r != "") for r in read)
            details[f"{task}/chance"] = data.chance(task)
            details[f"{task}/majority"] = data.majority(task)
            details[f"{task}/questions"], details[f"{task}/generated"] = len(questions), len(chosen)
        for metric in ("loglik", "loglik_norm", "generation", "format", "chance", "majority"):
            details[metric] = statistics.mean(details[f"{task}/{metric}"] for task in data.questions)
        for count in ("questions", "generated"):
            details[count] = sum(details[f"{task}/{count}"] for task in data.questions)
        return Evaluation(accuracy=details[evaluation.protocol], loss=nll / max(tokens, 1), details=details)

    def check_records(self, records: list[dict], source: Path, key_names: list[str]) -> None:
        """Every record needs a text ``instruction`` (or ``text``); a ``task``, where given, must be one the
        run trained on (``key_names``) or one of LLM-Adapters' tasks, whose answer pattern is known."""
        known = sorted(set(ANSWER_TASKS) | set(key_names))
        for number, record in enumerate(records, 1):
            instruction = record.get("instruction", record.get("text"))
            if instruction is None:
                raise ConfigError(f"input record {number} has no 'instruction' (or 'text'): every record needs the "
                                  "question to answer")
            if not isinstance(instruction, str) or not instruction.strip():
                raise ConfigError(f"input record {number}'s instruction must be a non-empty text, got "
                                  f"{instruction!r:.60}")
            task = record.get("task")
            if task not in (None, "") and task not in known:
                raise ConfigError(f"input record {number} names the task {task!r}, whose answer pattern is unknown; "
                                  f"known tasks: {', '.join(known)} (leave 'task' out to read the first of "
                                  "the instruction's choices)")

    def predict(self, model: MoEModel, records: list[dict], key_names: list[str], batch_size: int) -> list[dict]:
        """The generated response to each record's ``instruction`` (and optional ``input``; a bare ``text`` is
        the instruction), in the training prompt, decoded as evaluation decodes; with the choice it names
        when the instruction offers choices (``Answer format: a/b``), else ``answer`` is null."""
        self._tokenizer_for_inference()
        examples = [CommonsenseExample(str(record.get("task") or ""), record.get("instruction", record.get("text")),
                                       str(record.get("input") or ""), "", "") for record in records]
        encoded = [ScoredQuestion(e.task, fit_prompt(_token_ids(self.tokenizer, e.prompt, special=True),
                                                     self.config.model.max_length - self.config.evaluation.max_new_tokens,
                                                     self.tokenizer.bos_token_id), [], [], e.choices, -1)
                   for e in examples]
        answers = score_and_generate(model, encoded, batch_size, self.config.evaluation.max_new_tokens,
                                     self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, desc="generating",
                                     num_beams=self.config.evaluation.num_beams)
        texts = self.tokenizer.batch_decode([a.generated for a in answers], skip_special_tokens=True)
        return [{"instruction": e.instruction, "input": e.input, "generated": text,
                 "answer": named_choice(e, text)} for e, text in zip(examples, texts)]

    def labelled(self, path: Path, key_names: list[str]) -> CommonsenseTestSet:
        """Every question of a suite folder (one sub-folder per task with a ``test.json``) or of one task's
        JSON file (the task is its folder's name, which picks the answer pattern: ``boolq/test.json``)."""
        self._tokenizer_for_inference()
        if path.is_dir():
            subsets = load_commonsense(path, need_train=False).test
        elif path.is_file() and path.suffix.lower() != ".json":
            raise ConfigError(f"--data {path} is not a commonsense test set: a causal-lm run is evaluated on a "
                              "commonsense folder (one sub-folder per task) or one task's test.json")
        elif path.is_file():
            subsets = {path.parent.name: read_task_file(path, path.parent.name)}
        else:
            raise ConfigError(f"--data {path} does not exist: give a commonsense folder or a task's test.json")
        return encode_questions(self.tokenizer, subsets, self.config.model.max_length,
                                self.config.evaluation.max_new_tokens)

    def _tokenizer_for_inference(self) -> None:
        if getattr(self, "tokenizer", None) is None:
            from ubsmoe.model import load_tokenizer

            self.tokenizer = load_tokenizer(self.config.model.backbone)


def named_choice(example: CommonsenseExample, generated: str) -> str | None:
    """The choice a free-form generated response names: the task's LLM-Adapters pattern for a known task,
    else the first of the instruction's choices to appear; None when the instruction offers none."""
    if example.task:
        return extract_answer(example.task, generated) or None
    if not example.choices:
        return None
    found = re.search("|".join(re.escape(c) for c in sorted(example.choices, key=len, reverse=True)), generated)
    return found.group(0) if found else None


@dataclass
class Answer:
    """What a model made of a question: each choice's response log-likelihood, and its generated
    continuation (token ids, ending at end-of-sequence when it produced one)."""

    scores: list[float]
    generated: list[int]

    def likeliest(self, question: ScoredQuestion, per_char: bool = False) -> int:
        values = [s / n for s, n in zip(self.scores, question.response_chars)] if per_char else self.scores
        return max(range(len(values)), key=values.__getitem__)


@torch.inference_mode()
def score_and_generate(model: MoEModel, questions: list[ScoredQuestion], batch_size: int, max_new_tokens: int,
                       eos: int, pad: int, observe: ForwardObserver | None = None, desc: str = "",
                       num_beams: int = 1) -> list[Answer]:
    """Each question's choices scored and its answer generated from one pass over its prompt.

    ``batch_size`` prompts at a time run left-padded with the backbone's key-value cache; the cache is
    repeated once per choice to score the choices' responses (right-padded) after it, cut back, and then
    continued by greedy decoding or, with ``num_beams`` > 1, beam search (at most ``max_new_tokens``,
    stopping at ``eos``). ``observe`` sees the prompt passes (the inference FLOPs per token are those of
    reading prompts)."""
    from transformers import DynamicCache

    answers: list[Answer] = []
    for start in tqdm(range(0, len(questions), batch_size), desc=desc, leave=False, disable=None):
        chunk = questions[start:start + batch_size]
        ids, mask = _left_padded([q.prompt for q in chunk], pad)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        prompt = model.run_backbone(ids, mask, position_ids=positions, use_cache=True,
                                    cache=DynamicCache(config=model.backbone.config))
        last = prompt.last_hidden_state[:, -1:]  # (B, 1, d): predicts each response's first token
        first = model.head(last, torch.ones_like(last[..., 0], dtype=torch.bool)).log_softmax(-1).cpu()  # (B, V)
        if observe is not None:  # the prompt pass and its one projection per prompt
            observe(mask)
        cache = prompt.cache
        scores = (_score_choices(model, chunk, first, cache, mask, positions, pad)
                  if any(q.responses for q in chunk) else [[] for _ in chunk])
        if max_new_tokens == 0:  # scored only
            generated = [[] for _ in chunk]
        elif num_beams > 1:
            generated = _beam_search(model, last, cache, mask, positions, max_new_tokens, eos, num_beams)
        else:
            generated = _greedy(model, last, cache, mask, positions, max_new_tokens, eos, pad)
        answers += [Answer(s, g) for s, g in zip(scores, generated)]
    return answers


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    return ids, mask


def _score_choices(model: MoEModel, chunk: list[ScoredQuestion], first: torch.Tensor, cache, mask: torch.Tensor,
                   positions: torch.Tensor, pad: int) -> list[list[float]]:
    """Sum of log-probabilities of every choice's response after its prompt's cached keys and values;
    leaves ``cache`` as it found it. first: (B, V) log-probabilities of the token after each prompt.
    Every question of ``chunk`` has at least one response."""
    rows = [(qi, response) for qi, q in enumerate(chunk) for response in q.responses]
    owner = torch.tensor([qi for qi, _ in rows])
    length = max(len(r) for _, r in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    real = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, (_, response) in enumerate(rows):
        ids[i, : len(response)] = torch.tensor(response)
        real[i, : len(response)] = True
    totals = first[owner, ids[:, 0]].clone()  # each response's first token, predicted by its prompt
    if length > 1:
        cache.batch_select_indices(owner.to(model.device))
        extended = torch.cat([mask[owner], real.long()], dim=1)
        steps = positions[owner, -1:] + 1 + torch.arange(length)
        hidden = model.run_backbone(ids, extended, position_ids=steps, use_cache=True, cache=cache).last_hidden_state
        scored = F.pad(real[:, 1:], (0, 1), value=False)  # positions whose next token is a real response token
        log_probs = model.head(hidden, real.to(hidden.device), positions=scored).log_softmax(-1).cpu()
        token_scores = log_probs.gather(1, ids[:, 1:][real[:, 1:]].unsqueeze(1)).squeeze(1)
        totals.index_add_(0, scored.nonzero()[:, 0], token_scores)
        cache.crop(-length)  # back to the prompts (a negative count removes that many positions)
        first_rows = torch.tensor([0] + [len(q.responses) for q in chunk[:-1]]).cumsum(0)
        cache.batch_select_indices(first_rows.to(model.device))
    per_question = [[] for _ in chunk]
    for (qi, _), total in zip(rows, totals.tolist()):
        per_question[qi].append(total)
    return per_question


def _greedy(model: MoEModel, last: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor,
            max_new_tokens: int, eos: int, pad: int) -> list[list[int]]:
    """Greedy continuations after the cached prompts; each stops at ``eos`` (kept) or ``max_new_tokens``."""
    hidden, batch = last, last.shape[0]
    new = torch.empty((batch, 0), dtype=torch.long)
    done = torch.zeros(batch, dtype=torch.bool)
    for step in range(max_new_tokens):
        token = model.head(hidden, torch.ones_like(hidden[..., 0], dtype=torch.bool)).argmax(-1).cpu()  # (B,)
        token = torch.where(done, torch.full_like(token, pad), token)
        new = torch.cat([new, token.unsqueeze(1)], dim=1)
        done |= token == eos
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        hidden = model.run_backbone(token.unsqueeze(1), mask, position_ids=positions, use_cache=True,
                                    cache=cache).last_hidden_state
    results = []
    for row in new.tolist():
        results.append(row[: row.index(eos) + 1] if eos in row else row)
    return results


def _beam_search(model: MoEModel, last: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor,
                 max_new_tokens: int, eos: int, num_beams: int) -> list[list[int]]:
    """Beam search after the cached prompts, with the rules of Hugging Face's (length penalty 1, no early
    stopping): each step ranks the 2n best extensions of a prompt's n open beams by summed
    log-probability; an extension ending with ``eos`` among the first n is a finished continuation
    (the best n are kept, scored per token), the first n others stay open. A prompt is done once it has n
    finished ones and none of its open beams can beat the worst of them; after ``max_new_tokens`` the
    open beams compete too. The answer is the best finished continuation.
    last: (B, 1, d); mask, positions: (B, P); the cache holds the B prompts and is reordered in place."""
    batch, n = last.shape[0], num_beams
    log_probs = model.head(last, torch.ones_like(last[..., 0], dtype=torch.bool)).log_softmax(-1).cpu()  # (B, V)
    vocab = log_probs.shape[-1]
    scores = torch.zeros(batch, 1, dtype=log_probs.dtype)  # one open beam per prompt to start with
    sequences = torch.empty(batch, 0, dtype=torch.long)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    beams = 1
    for step in range(max_new_tokens):
        totals = (scores.unsqueeze(2) + log_probs.view(batch, beams, vocab)).view(batch, -1)  # (B, beams V)
        best, index = totals.topk(2 * n, dim=1)  # enough that n stay open after those ending in eos
        keep_scores, keep_rows, keep_tokens = [], [], []
        for q in range(batch):
            chosen = []
            for rank, (value, flat) in enumerate(zip(best[q].tolist(), index[q].tolist())):
                beam, token = divmod(flat, vocab)
                if token == eos:
                    if rank < n and not done[q]:
                        _keep_best(finished[q], (value / (step + 1), sequences[q * beams + beam].tolist() + [eos]), n)
                elif len(chosen) < n:
                    chosen.append((value, q * beams + beam, token))
            if not done[q] and len(finished[q]) >= n:  # can an open beam still beat the worst finished one?
                done[q] = min(f[0] for f in finished[q]) >= chosen[0][0] / (step + 1)
            keep_scores += [c[0] for c in chosen]
            keep_rows += [c[1] for c in chosen]
            keep_tokens += [c[2] for c in chosen]
        rows, tokens = torch.tensor(keep_rows), torch.tensor(keep_tokens)
        scores = torch.tensor(keep_scores, dtype=log_probs.dtype).view(batch, n)
        sequences = torch.cat([sequences[rows], tokens.unsqueeze(1)], dim=1)
        if step == max_new_tokens - 1 or all(done):
            break
        cache.batch_select_indices(rows.to(model.device))  # each kept beam's history: its prompt's, then its parent beam's
        mask, positions = mask[rows], positions[rows]
        beams = n
        mask = torch.cat([mask, torch.ones((batch * n, 1), dtype=torch.long)], dim=1)
        positions = positions[:, -1:] + 1
        hidden = model.run_backbone(tokens.unsqueeze(1), mask, position_ids=positions, use_cache=True,
                                    cache=cache).last_hidden_state
        log_probs = model.head(hidden, torch.ones_like(hidden[..., 0], dtype=torch.bool)).log_softmax(-1).cpu()
    for q in range(batch):
        if not done[q]:  # out of tokens: the open beams compete with the finished ones
            for hypothesis in _open_beams(scores, sequences, q, n):
                _keep_best(finished[q], hypothesis, n)
    return [max(finished[q], key=lambda h: h[0])[1] for q in range(batch)]


def _keep_best(hypotheses: list[tuple[float, list[int]]], candidate: tuple[float, list[int]], n: int) -> None:
    """Add ``candidate`` (score, tokens) to at most ``n`` hypotheses, keeping the best."""
    hypotheses.append(candidate)
    if len(hypotheses) > n:
        hypotheses.remove(min(hypotheses, key=lambda h: h[0]))


def _open_beams(scores: torch.Tensor, sequences: torch.Tensor, q: int, n: int) -> list[tuple[float, list[int]]]:
    """Prompt q's open beams as (log-probability per token, tokens). scores: (B, n); sequences: (B n, L)."""
    return [(scores[q, b].item() / sequences.shape[1], sequences[q * n + b].tolist()) for b in range(n)]
