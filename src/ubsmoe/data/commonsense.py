"""The commonsense-reasoning suite in the LLM-Adapters format: a folder of tasks, a training mix, test subsets.

A suite folder holds one sub-folder per task (ARC-Challenge, ARC-Easy, boolq, openbookqa, piqa,
social_i_qa, winogrande, ...), each with ``test.json`` and possibly ``train.json``: JSON lists of records
``{"instruction", "input", "output", "answer"}``. The instruction lists the choices and ends with
``Answer format: answer1/answer2/...``; ``answer`` is the right one. Training uses a seeded sample of
the union of the train sets (in the spirit of Commonsense-15K); every task is scored on a seeded subset
of its test set. Data is read from a path: nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ubsmoe.config import ConfigError

_FORMAT = re.compile(r"Answer format:\s*([A-Za-z0-9_/ ]+?)\s*$")

# LLM-Adapters' evaluation prompt (commonsense_evaluate.py, no input), byte for byte: its indentation is
# part of what the published numbers were measured with. [choice] Training uses the same prompt, so
# that train and test prompts agree (LLM-Adapters' training template differs in whitespace only).
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request. \n\n                ### Instruction:\n                {instruction}\n\n"
          "                ### Response:\n                ")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "                ### Instruction:\n                {instruction}\n\n"
                     "                ### Input:\n                {input}\n\n"
                     "                ### Response:\n                ")

# What a generated answer is read as, per task (LLM-Adapters' extract_answer): the first match, case-sensitive.
_ANSWER_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "winogrande": r"option1|option2",
    "hellaswag": r"ending1|ending2|ending3|ending4",
}
_DEFAULT_PATTERN = r"answer1|answer2|answer3|answer4|answer5"  # ARC, OpenBookQA, Social IQa
# The commonsense tasks of LLM-Adapters, whose answers these patterns read.
ANSWER_TASKS = ("ARC-Challenge", "ARC-Easy", "boolq", "hellaswag", "openbookqa", "piqa", "social_i_qa", "winogrande")


@dataclass(frozen=True)
class CommonsenseExample:
    """One record of a task: the instruction (with its choices), an optional input, the reference
    response (``output``, e.g. "the correct answer is answer3") and the right choice (``answer``)."""

    task: str
    instruction: str
    input: str
    output: str
    answer: str

    @property
    def choices(self) -> list[str]:
        return answer_choices(self.instruction)

    @property
    def prompt(self) -> str:
        """The text the model continues: the instruction (and input) in the prompt template."""
        if self.input:
            return PROMPT_WITH_INPUT.format(instruction=self.instruction, input=self.input)
        return PROMPT.format(instruction=self.instruction)

    def response(self, choice: str | None = None) -> str:
        """The reference response, or the one that names ``choice`` instead ("the correct answer is answer2"):
        the reference ends with its answer (the loader checks)."""
        return self.output if choice is None else self.output[: len(self.output) - len(self.answer)] + choice


@dataclass
class CommonsenseSuite:
    """Examples by task name; a task without a train file has no entry in ``train``."""

    train: dict[str, list[CommonsenseExample]]
    test: dict[str, list[CommonsenseExample]]

    @property
    def tasks(self) -> list[str]:
        return sorted(self.test)


def answer_choices(instruction: str) -> list[str]:
    """The choices an instruction offers, from its closing ``Answer format: a/b/c`` line."""
    match = _FORMAT.search(instruction)
    if match is None:
        return []
    return [choice.strip() for choice in match.group(1).split("/") if choice.strip()]


def load_commonsense(folder: str | Path, need_train: bool = True) -> CommonsenseSuite:
    """Every task sub-folder of ``folder`` with a ``test.json`` (and maybe a ``train.json``; ``need_train``:
    at least one task must have one)."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"commonsense folder {root} does not exist; pass the folder that holds one sub-folder "
                          "per task (ARC-Easy/train.json, ARC-Easy/test.json, ...)")
    suite = CommonsenseSuite({}, {})
    untested = []
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if not (task_dir / "test.json").is_file():
            if (task_dir / "train.json").is_file():
                untested.append(task_dir.name)
            continue
        suite.test[task_dir.name] = read_task_file(task_dir / "test.json", task_dir.name)
        if (task_dir / "train.json").is_file():
            suite.train[task_dir.name] = read_task_file(task_dir / "train.json", task_dir.name)
    if untested:
        raise ConfigError(f"{root}: the task folder(s) {', '.join(untested)} hold a train.json but no test.json, "
                          "so they would be neither scored nor trained on: add their test.json, or move them out")
    if not suite.test:
        raise ConfigError(f"{root} holds no task folder with a test.json; expected e.g. {root}/boolq/test.json")
    if need_train and not suite.train:
        raise ConfigError(f"{root} holds no task folder with a train.json: there is nothing to train on")
    return suite


def read_task_file(path: Path, task: str) -> list[CommonsenseExample]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not a UTF-8 JSON file ({error})") from None
    if not isinstance(records, list) or not records:
        raise ConfigError(f"{path} must hold a non-empty JSON list of records")
    examples = []
    for number, record in enumerate(records, 1):  # counted as a person counts, from 1
        missing = [k for k in ("instruction", "output", "answer") if not isinstance(record, dict) or k not in record]
        if missing:
            raise ConfigError(f"{path}: record {number} lacks {', '.join(missing)}; every record needs "
                              "instruction, output and answer (input may be empty)")
        wrong = [k for k in ("instruction", "output", "answer") if not isinstance(record[k], str)]
        wrong += ["input"] if not isinstance(record.get("input") or "", str) else []
        if wrong:
            raise ConfigError(f"{path}: record {number}'s {', '.join(wrong)} must be text, got "
                              f"{', '.join(repr(record[k])[:40] for k in wrong)}")
        example = CommonsenseExample(task, str(record["instruction"]), str(record.get("input") or ""),
                                     str(record["output"]), str(record["answer"]))
        if not example.output.endswith(example.answer):
            raise ConfigError(f"{path}: record {number}'s output {example.output[-60:]!r} does not end with its "
                              f"answer {example.answer!r}; responses are scored as the output with the answer swapped")
        if example.answer not in example.choices:
            raise ConfigError(f"{path}: record {number}'s answer {example.answer!r} is not among the choices its "
                              f"instruction offers ({'/'.join(example.choices) or 'no Answer format line'})")
        examples.append(example)
    return examples


def _key(example: CommonsenseExample) -> str:
    return " ".join(f"{example.instruction} {example.input}".casefold().split())


def training_mix(suite: CommonsenseSuite, max_samples: int, seed: int) -> tuple[list[CommonsenseExample], int]:
    """A seeded sample of at most ``max_samples`` (0: all) from the union of the train sets, without
    duplicates and without any example whose question is also a test question -> (examples, removed)."""
    held_out = {_key(e) for examples in suite.test.values() for e in examples}
    pool, seen, removed = [], set(), 0
    for task in sorted(suite.train):
        for example in suite.train[task]:
            key = _key(example)
            if key in held_out or key in seen:
                removed += 1
                continue
            seen.add(key)
            pool.append(example)
    rng = random.Random(seed)
    if max_samples and max_samples < len(pool):
        pool = rng.sample(pool, max_samples)
    else:
        rng.shuffle(pool)
    return pool, removed


def evaluation_subsets(suite: CommonsenseSuite, per_task: int, seed: int) -> dict[str, list[CommonsenseExample]]:
    """A seeded subset of at most ``per_task`` (0: all) examples of every task's test set, in file order."""
    subsets = {}
    for task in suite.tasks:
        examples = suite.test[task]
        if per_task and per_task < len(examples):
            chosen = sorted(random.Random(f"{seed}/{task}").sample(range(len(examples)), per_task))
            examples = [examples[i] for i in chosen]
        subsets[task] = list(examples)
    return subsets


def extract_answer(task: str, generated: str) -> str:
    """The choice a generated response names: the first match of the task's pattern, "" when none (which
    counts as wrong). ``generated`` is the text after the prompt."""
    found = re.findall(_ANSWER_PATTERNS.get(task, _DEFAULT_PATTERN), generated.strip())
    return found[0] if found else ""
