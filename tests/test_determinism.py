"""Same-seed determinism of every registered method with dropout on, and per-tier evaluation checked
tier by tier, without ``evaluate_tiers``' shared-model cache."""

import pytest
import torch

from tiny_experiment import tiny_overrides
from ubsmoe.config import load_config
from ubsmoe.engine.population import sample_clients
from ubsmoe.engine.evaluation import evaluate, evaluate_tiers, setup_tier
from ubsmoe.engine.client_round import run_client
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.engine.run_records import RunResults, TierScore
from ubsmoe.engine.server import instruction_for
from ubsmoe.methods import REGISTRY

DROPOUT = 0.1  # the tiny backbone's checkpoint has dropout 0: switch it on so the masks' seeding is exercised
CHEAP = {"model.dropout": DROPOUT, "federation.rounds": 2, "train.local_steps": 2}


def config_for(tiny_bert, tiny_task, method, **extra):
    return load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **(CHEAP | extra)), method=method)


def recorded_numbers(results: RunResults) -> list[dict]:
    """Per round: each tier's accuracy and loss, the test loss and every client's train loss."""
    return [{"tier_accuracy": h.tier_accuracy, "tier_loss": h.tier_loss, "test_loss": h.test_loss,
             "train_loss": {c.id: c.train_loss for c in h.clients}} for h in results.history]


def train_losses(results: RunResults) -> list[float]:
    return [c.train_loss for h in results.history for c in h.clients]


def two_forwards_in_train_mode(exp) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of one training batch, computed twice by the experiment's model in train mode."""
    model = exp.model
    input_ids, attention_mask, _ = exp.train.batch(torch.arange(8))
    model.train()
    with torch.no_grad():
        return model(input_ids, attention_mask), model(input_ids, attention_mask)


def run_rounds(exp, rounds: int):
    """The server state after ``rounds`` rounds of ``exp``, trained as ``run_experiment`` trains them."""
    config, method, model = exp.config, exp.method, exp.model
    state = method.initial_state(model)
    runtime = exp.client_runtime(None)
    for round_index in range(1, rounds + 1):
        sampled = sample_clients(exp.clients, config.federation.fraction_fit, round_index, config.seed)
        updates = [run_client(runtime, instruction_for(method, state, client, round_index)) for client in sampled]
        state = method.aggregate(state, updates)
        method.sync_frozen(model, method.frozen_state(state))  # as the engine's evaluation does
    return state


def evaluate_each_tier(exp, state) -> dict[float, dict]:
    """{budget: evaluate(...)} with every tier's model loaded, set up and evaluated on its own (no cache)."""
    method, model = exp.method, exp.model
    results = {}
    for budget in exp.tiers:
        setup_tier(model, method, state, budget)
        try:
            results[budget] = evaluate(model, exp.task, exp.test, exp.config.train.eval_batch_size)
        finally:
            method.teardown_client(model)
    return results


# ------------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_same_seed_gives_bit_identical_numbers_with_dropout(tiny_bert, tiny_task, method):
    """Guards: with dropout on, a run is a function of its config and seed alone, for every method."""
    config = config_for(tiny_bert, tiny_task, method)
    other_seed = config_for(tiny_bert, tiny_task, method, seed=config.seed + 1)

    first_logits, second_logits = two_forwards_in_train_mode(build_experiment(config))
    runs = [run_experiment(config, show_progress=False) for _ in range(2)]
    reseeded = run_experiment(other_seed, show_progress=False)

    assert not torch.equal(first_logits, second_logits), "dropout is not active: the test would be vacuous"
    assert runs[0].config["model"]["dropout"] == DROPOUT
    assert recorded_numbers(runs[0]) == recorded_numbers(runs[1])
    assert len(train_losses(runs[0])) == 2 * 2  # two clients, two rounds: nothing compared is missing
    assert train_losses(reseeded) != train_losses(runs[0])


# ------------------------------------------------------------------------------- per-tier evaluation
ONE_ROUND_TWO_RANKS = {"federation.rounds": 1, "federation.budgets": "0.25,1.0"}  # LoRA ranks 1 and 4 of 4


def tier_numbers(results: dict[float, TierScore]) -> dict[str, tuple[float, float]]:
    return {str(b): (r.accuracy, r.loss) for b, r in results.items()}


def recorded_tier_numbers(results: RunResults) -> dict[str, tuple[float, float]]:
    final = results.final
    return {b: (final.tier_accuracy[b], final.tier_loss[b]) for b in final.tier_accuracy}


def evaluated_tiers(tiny_bert, tiny_task, method: str):
    """One round with tiers at LoRA ranks 1 and 4: (experiment, each tier evaluated on its own, what
    ``evaluate_tiers`` reports, what ``run_experiment`` records)."""
    config = config_for(tiny_bert, tiny_task, method, **ONE_ROUND_TWO_RANKS)
    exp = build_experiment(config)
    state = run_rounds(exp, config.federation.rounds)
    reported = evaluate_tiers(exp.model, exp.task, exp.method, state, exp.test, exp.tiers, config.train.eval_batch_size)
    return exp, evaluate_each_tier(exp, state), reported, run_experiment(config, show_progress=False)


@pytest.mark.parametrize("method", ["fedavg-lora", "flora", "florist"])
def test_tiers_holding_one_model_evaluate_alike_when_evaluated_one_by_one(tiny_bert, tiny_task, method):
    """Guards: the tiers of these methods really hold the same model (fedavg-lora shares one evaluation,
    FLoRA and FLoRIST evaluate each tier at its own rank), so their equal accuracies are measured.
    Regression: FLoRA and FLoRIST tiers shared one evaluation, so every tier reported the first tier's
    inference FLOPs (rank 1) and the low tier's inference reduction read 0."""
    exp, separate, reported, recorded = evaluated_tiers(tiny_bert, tiny_task, method)

    assert len(exp.tiers) == 2
    assert len({exp.method.eval_key(b) for b in exp.tiers}) == (1 if method == "fedavg-lora" else 2)
    assert len(set(tier_numbers(separate).values())) == 1, tier_numbers(separate)
    assert tier_numbers(separate) == tier_numbers(reported) == recorded_tier_numbers(recorded)
    if method != "fedavg-lora":  # each tier runs its own rank-r_c adapter
        assert recorded.cost.low_tier_reduction["inference_flops_per_token"] > 0


@pytest.mark.parametrize("method", ["flexlora", "hetlora"])
def test_tiers_holding_different_models_evaluate_differently(tiny_bert, tiny_task, method):
    """Guards: the one-by-one tier check can fail: heterogeneous-rank tiers give different losses."""
    exp, separate, reported, recorded = evaluated_tiers(tiny_bert, tiny_task, method)

    low, high = exp.tiers
    assert exp.method.eval_key(low) != exp.method.eval_key(high)
    assert separate[low].loss != separate[high].loss
    assert tier_numbers(separate) == tier_numbers(reported) == recorded_tier_numbers(recorded)
