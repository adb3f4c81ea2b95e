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
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ubsmoe.config import ConfigError
from ubsmoe.data.commonsense import (ANSWER_TASKS, CommonsenseExample, evaluation_subsets, extract_answer, load_commonsense,
                                     read_task_file, training_mix)
from ubsmoe.data.dataset import Batch
from ubsmoe.model import HeadFactory, MoEModel, TaskHead
from ubsmoe.model.backbones import BackboneFamily, resolve_backbone
from ubsmoe.tasks.base import Evaluation, ForwardObserver, Task, TaskData, register
from ubsmoe.tasks.commonsense_encoding import (CommonsenseTestSet, ScoredQuestion, encode_questions, encode_training,
                                               fit_prompt, next_token_positions, token_ids)
from ubsmoe.tasks.commonsense_scoring import Answer, generation_subset, named_choice, score_and_generate

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


def suite_path(dataset: str) -> Path:
    if not dataset.startswith(DATASET_PREFIX):
        raise ConfigError(f"task causal-lm reads data.dataset=commonsense:PATH (a folder of tasks in the LLM-Adapters "
                          f"format), got {dataset!r}")
    return Path(dataset[len(DATASET_PREFIX):]).expanduser()


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
        encoded = [ScoredQuestion(e.task, fit_prompt(token_ids(self.tokenizer, e.prompt, special=True),
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
