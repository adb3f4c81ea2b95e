import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_checkpoints import PROMPT_WORDS, WORDS, write_tiny_bert, write_tiny_llama  # noqa: E402
from tiny_experiment import write_tiny_suite, write_tiny_task  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    return write_tiny_task(tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory) -> Path:
    """Two tasks with train and test sets and one test-only task, in the LLM-Adapters layout."""
    return write_tiny_suite(tmp_path_factory.mktemp("commonsense"))


@pytest.fixture(scope="session")
def tiny_causal_llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-causal-llama"), words=tuple(WORDS) + tuple(PROMPT_WORDS), tied=True,
                            bos=True)
