"""Every method's numbers on the tiny setup are those recorded in tests/data/reference_numbers.json.

The file was written before the task seam (tasks/) took classification out of the model and the
engine; that refactoring, and any later one, must leave every number as it was.
"""

import json

import pytest

from reference_numbers import REFERENCE, run_numbers, tiny_setup


@pytest.fixture(scope="module")
def numbers(tmp_path_factory):
    return run_numbers(*tiny_setup(tmp_path_factory.mktemp("reference")))


def test_every_method_gives_the_recorded_numbers(numbers):
    reference = json.loads(REFERENCE.read_text())

    assert sorted(numbers) == sorted(reference), "a method was added or removed: rewrite the reference file"
    for run, rounds in reference.items():
        assert len(numbers[run]) == len(rounds), run  # zip alone would hide a missing round
        for recorded, now in zip(rounds, numbers[run]):
            # exact on this machine; the tolerance only absorbs another CPU's summation order
            assert now["tier_accuracy"] == recorded["tier_accuracy"], run
            assert now["train_flops"] == recorded["train_flops"], run
            assert now["inference_flops"] == pytest.approx(recorded["inference_flops"], rel=1e-12), run
            assert now["tier_loss"] == pytest.approx(recorded["tier_loss"], rel=1e-5), run
            assert now["train_loss"] == pytest.approx(recorded["train_loss"], rel=1e-5), run
