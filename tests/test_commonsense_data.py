"""The commonsense suite loader: the shared data, the training mix, test subsets, bad folders."""

import json
from pathlib import Path

import pytest

from ubsmoe.config import ConfigError
from ubsmoe.data.commonsense import (answer_choices, evaluation_subsets, extract_answer, load_commonsense,
                                      training_mix)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"the commonsense suite is not at {SHARED}")


def record(question: str, answer: str = "answer1", choices: str = "answer1/answer2") -> dict:
    return {"instruction": f"Please choose: {question}\n\nAnswer format: {choices}", "input": "",
            "output": f"the correct answer is {answer}", "answer": answer}


def write_suite(root: Path, tasks: dict[str, dict[str, list[dict]]]) -> Path:
    for task, splits in tasks.items():
        (root / task).mkdir(parents=True)
        for split, records in splits.items():
            (root / task / f"{split}.json").write_text(json.dumps(records))
    return root


@needs_shared
def test_the_shared_suite_loads_every_task_with_its_counts():
    suite = load_commonsense(SHARED)

    assert {t: len(v) for t, v in suite.train.items()} == {"ARC-Challenge": 1119, "ARC-Easy": 2251, "boolq": 9427,
                                                           "openbookqa": 4957}
    assert {t: len(v) for t, v in suite.test.items()} == {
        "ARC-Challenge": 1172, "ARC-Easy": 2376, "boolq": 3270, "openbookqa": 500, "piqa": 1838, "social_i_qa": 1954,
        "winogrande": 1267}
    assert suite.test["boolq"][0].choices == ["true", "false"]
    assert suite.test["winogrande"][0].choices == ["option1", "option2"]  # the format shares a line with the options
    assert suite.test["piqa"][0].choices == ["solution1", "solution2"]


@needs_shared
def test_training_mix_is_seeded_capped_and_never_holds_a_test_question():
    suite = load_commonsense(SHARED)

    mix, removed = training_mix(suite, 2000, seed=0)
    again, _ = training_mix(suite, 2000, seed=0)
    other, _ = training_mix(suite, 2000, seed=1)

    assert len(mix) == 2000 and mix == again and mix != other
    assert {e.task for e in mix} == set(suite.train)
    test_questions = {(e.instruction, e.input) for examples in suite.test.values() for e in examples}
    assert not [e for e in mix if (e.instruction, e.input) in test_questions]
    assert removed == 8  # repeated questions across the train sets and train questions also asked in a test set


def test_training_mix_drops_repeats_and_test_questions(tmp_path):
    suite = load_commonsense(write_suite(tmp_path, {
        "a": {"train": [record("one"), record("ONE "), record("two"), record("three")], "test": [record("three")]},
        "b": {"test": [record("four", "true", "true/false")]},
    }))

    mix, removed = training_mix(suite, 0, seed=0)

    assert sorted(e.instruction.split(": ")[1].split("\n")[0] for e in mix) == ["one", "two"]
    assert removed == 2
    assert suite.tasks == ["a", "b"] and "b" not in suite.train


def test_test_subsets_are_seeded_per_task_and_keep_file_order(tmp_path):
    suite = load_commonsense(write_suite(tmp_path, {
        "a": {"train": [record("t")], "test": [record(f"q{i}") for i in range(20)]},
        "b": {"test": [record(f"r{i}") for i in range(3)]},
    }))

    subsets = evaluation_subsets(suite, 5, seed=0)

    assert len(subsets["a"]) == 5 and len(subsets["b"]) == 3
    order = [suite.test["a"].index(e) for e in subsets["a"]]
    assert order == sorted(order)
    assert subsets == evaluation_subsets(suite, 5, seed=0) and subsets != evaluation_subsets(suite, 5, seed=1)


def test_answer_choices_read_the_closing_format_line():
    assert answer_choices("Q?\n\nAnswer1: x Answer2: y\n\nAnswer format: answer1/answer2") == ["answer1", "answer2"]
    assert answer_choices("no format here") == []


@pytest.mark.parametrize("layout, message", [
    ({}, "holds no task folder with a test.json"),
    ({"a": {"test": [record("q")]}}, "holds no task folder with a train.json"),
    ({"a": {"train": [record("q")], "test": [{"instruction": "q"}]}}, "record 1 lacks output, answer"),
    ({"a": {"train": [record("q", "answer3")], "test": [record("q")]}}, "answer 'answer3' is not among the choices"),
])
def test_bad_suites_are_refused_with_the_file_and_the_fix(tmp_path, layout, message):
    write_suite(tmp_path, layout)
    with pytest.raises(ConfigError, match=message):
        load_commonsense(tmp_path)


def test_a_missing_folder_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass the folder"):
        load_commonsense(tmp_path / "nowhere")


@pytest.mark.parametrize("task, generated, expected", [
    ("boolq", "the correct answer is true", "true"),
    ("boolq", "false. I mean true", "false"),  # several matches: the first
    ("boolq", "The correct answer is True", ""),  # case-sensitive, as LLM-Adapters: no match counts as wrong
    ("piqa", "  solution2 is better than solution1", "solution2"),
    ("winogrande", "the correct answer is option1", "option1"),
    ("ARC-Challenge", "the correct answer is answer4", "answer4"),
    ("openbookqa", "answer5answer1", "answer5"),
    ("social_i_qa", "I do not know", ""),
    ("social_i_qa", "the correct answer is option1", ""),  # another task's vocabulary is no match
])
def test_extract_answer_takes_the_first_match_of_the_tasks_pattern(task, generated, expected):
    assert extract_answer(task, generated) == expected


def test_prompt_and_responses_of_an_example(tmp_path):
    suite = load_commonsense(write_suite(tmp_path, {"a": {"train": [record("q")], "test": [record("why?", "answer2")]}}))
    example = suite.test["a"][0]

    assert example.prompt.startswith("Below is an instruction that describes a task. Write a response")
    assert example.prompt.endswith("Answer format: answer1/answer2\n\n                ### Response:\n                ")
    assert example.response() == "the correct answer is answer2"
    assert [example.response(c) for c in example.choices] == ["the correct answer is answer1",
                                                            "the correct answer is answer2"]
