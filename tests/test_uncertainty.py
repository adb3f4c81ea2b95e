"""The standard errors a comparison states, the differences it marks, the runs it calls not arrived, on
hand-made tables."""

import math

import pytest

from ubsmoe.engine.run_records import RoundCost, RoundRecord, RunCost, RunResults
from ubsmoe.report.uncertainty import (accuracy_error, beyond_two_se, proportion_error, ratio_interval,
                                       summarise_uncertainty, task_mean_error)


def test_the_standard_error_of_a_share_and_of_a_mean_over_tasks():
    assert proportion_error(0.5, 100) == pytest.approx(0.05)
    assert proportion_error(0.9, 400) == pytest.approx(0.015)
    details = {"boolq/loglik": 0.5, "boolq/questions": 100, "piqa/loglik": 0.9, "piqa/questions": 400,
               "boolq/generation": 0.8, "boolq/generated": 25, "piqa/generation": 0.5, "piqa/generated": 25}
    # sqrt(0.25 / 100 + 0.09 / 400) / 2
    assert task_mean_error(details, "loglik") == pytest.approx(math.sqrt(0.0025 + 0.000225) / 2)
    assert task_mean_error(details, "generation") == pytest.approx(math.sqrt(0.16 / 25 + 0.25 / 25) / 2)
    assert math.isnan(task_mean_error({"boolq/loglik": 0.5}, "loglik"))  # no counts: no claim


def run(accuracies: list[float], num_test: int = 100, protocol: str = "generation") -> RunResults:
    """A one-tier run whose rounds scored ``accuracies`` on ``num_test`` questions (nothing else recorded)."""
    history = [RoundRecord(i + 1, {"0.5": a}, a, {"0.5": 1.0}, 1.0, RoundCost([], {})) for i, a in enumerate(accuracies)]
    return RunResults(method="smoe", config={"evaluation": {"protocol": protocol}}, task="classification",
                      label_names=[], num_train=0, num_test=num_test, duplicates_removed=0, tiers=[0.5], clients=[],
                      parameters={}, k_max=1, shared_experts=0, round0={}, history=history, cost=RunCost({}, {}, 0.0),
                      runtime_s=0.0)


def entry(runs: list[RunResults]) -> dict:
    final = [r.final.tier_accuracy["0.5"] for r in runs]
    mean = sum(final) / len(final)
    return {"tiers": ["0.5"], "accuracy": {"0.5": {"mean": mean}}, "average": {"mean": mean}}


def test_differences_beyond_two_standard_errors_and_runs_that_have_not_arrived():
    runs = {"ubsmoe": [run([0.40, 0.50])], "hetlora": [run([0.52, 0.54])], "smoe": [run([0.30, 0.70])]}
    methods = {label: entry(r) for label, r in runs.items()}

    summarise_uncertainty(runs, methods)

    assert methods["ubsmoe"]["accuracy_se"]["0.5"] == pytest.approx(0.05)  # 0.5 of 100 questions
    assert accuracy_error(runs["smoe"], "0.5") == pytest.approx(math.sqrt(0.21 / 100))
    # 0.54 - 0.50 = 0.04 is within 2 sqrt(0.05^2 + SE^2) ~ 0.14; 0.70 - 0.50 = 0.20 is beyond ~ 0.137
    marked = beyond_two_se(methods)
    assert {(d["variant"], d["tier"]) for d in marked} == {("smoe", "0.5"), ("smoe", "average")}
    # ubsmoe moved 0.10 > its SE 0.05; hetlora 0.02 < 0.0498
    assert [methods[m]["arrived"]["0.5"]["arrived"] for m in ("ubsmoe", "hetlora")] == [False, True]


def test_a_ratio_interval_covers_the_ratio_and_widens_with_the_errors():
    low, high = ratio_interval(0.6, 0.03, 0.4, 0.02)
    assert low < 1.5 < high
    wide = ratio_interval(0.6, 0.06, 0.4, 0.04)
    assert wide[0] < low and wide[1] > high
    assert low == pytest.approx(1.5 * math.exp(-1.96 * math.sqrt(2 * 0.05 ** 2)))
