"""The model a run saves (OUT/model): ``ubsmoe predict`` and ``ubsmoe evaluate`` rebuild it without
upcycling again, give each tier's model exactly (the same scores as the run's last round), refuse a
tier the run does not have, and report a damaged or missing model as a user error."""

import json

import pytest

from tiny_experiment import TOPICS, tiny_overrides
from ubsmoe.cli import main

import ubsmoe.model.moe_model as moe_model
from ubsmoe.engine.run_folder import read_results


@pytest.fixture(scope="module", params=["smoe", "flora"])  # flora: the merged base rebuilt from the state
def finished(request, tiny_bert, tiny_task, tmp_path_factory):
    out = tmp_path_factory.mktemp("saved") / "run"
    assert main(["run", "--quiet", "--method", request.param, "--out", str(out)]
                + tiny_overrides(tiny_bert, tiny_task)) == 0
    return out


def test_the_saved_model_gives_every_tiers_last_scores_without_upcycling(finished, tiny_task, tmp_path, monkeypatch):
    from ubsmoe.engine.evaluation import evaluate
    from ubsmoe.engine.saved_model import load_model

    results = read_results(finished)
    monkeypatch.setattr(moe_model, "upcycled_parts", lambda *a, **k: pytest.fail("upcycled again"))
    loaded = load_model(finished)

    for tier in loaded.experiment.tiers:  # the run's own test split, each tier's model rebuilt from the saved state
        loaded.setup_tier(tier)
        scores = evaluate(loaded.experiment.model, loaded.experiment.task, loaded.experiment.test, 64)
        assert scores.accuracy == results.final.tier_accuracy[str(tier)]
        assert scores.loss == results.final.tier_loss[str(tier)]

    assert main(["evaluate", "--run", str(finished), "--data", str(tiny_task), "--output", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())["tiers"]
    assert set(scores) == set(results.final.tier_accuracy)
    assert all(0 <= score["accuracy"] <= 1 for score in scores.values())


def test_predict_writes_a_label_and_probabilities_per_text(finished, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["film music award star", "bank rates market profit", "game match team goal"]))
    output = tmp_path / "predictions.jsonl"

    assert main(["predict", "--run", str(finished), "--tier", "0.5", "--input", str(texts), "--output", str(output)]) == 0

    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["text"] for r in rows] == texts.read_text().splitlines()
    for row in rows:
        assert set(row["probabilities"]) == set(TOPICS) and row["label"] in TOPICS
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)


def test_predict_and_evaluate_refuse_bad_input(finished, tmp_path, capsys):
    texts = tmp_path / "t.txt"
    texts.write_text("bank rates\n")
    assert main(["predict", "--run", str(finished), "--tier", "0.3", "--input", str(texts), "--output",
                 str(tmp_path / "p.jsonl")]) == 2
    assert "--tier 0.3 is not a tier of this model; its tiers are 0.5, 1" in capsys.readouterr().err
    assert main(["predict", "--run", str(tmp_path), "--tier", "0.5", "--input", str(texts), "--output",
                 str(tmp_path / "p.jsonl")]) == 2
    assert "holds no saved model" in capsys.readouterr().err
    (finished / "model" / "state.safetensors").write_bytes(b"\x00" * 16)
    assert main(["evaluate", "--run", str(finished), "--data", str(texts)]) == 2
    assert "is damaged" in capsys.readouterr().err


def test_a_causal_lm_run_predicts_and_evaluates_as_its_last_round(tiny_causal_llama, tiny_suite, tmp_path_factory,
                                                                  tmp_path, capsys):
    """`ubsmoe evaluate` on the suite folder gives the run's final scores (every test question was scored);
    `ubsmoe predict` generates the answers that the generation protocol reads."""
    from tiny_experiment import causal_overrides

    run = tmp_path_factory.mktemp("causal-saved") / "run"
    assert main(["run", "--quiet", "--method", "smoe", "--out", str(run)]
                + causal_overrides(tiny_causal_llama, tiny_suite, **{"data.max_test_samples": 0})) == 0
    results = read_results(run)

    assert main(["evaluate", "--run", str(run), "--data", str(tiny_suite), "--output", str(tmp_path / "s.json")]) == 0
    assert "| tier | accuracy | loss | generation | loglik | loglik_norm |" in capsys.readouterr().out
    scores = json.loads((tmp_path / "s.json").read_text())["tiers"]
    for tier, accuracy in results.final.tier_accuracy.items():
        assert scores[tier]["accuracy"] == accuracy
        assert scores[tier]["details"] == results.history[-1].tier_details[tier]
    assert main(["evaluate", "--run", str(run), "--data", str(tiny_suite / "boolq" / "test.json"), "--tier", "1.0",
                 "--output", str(tmp_path / "boolq.json")]) == 0  # one task's file: that task's questions alone
    boolq = json.loads((tmp_path / "boolq.json").read_text())["tiers"]["1.0"]["details"]
    assert {k.split("/")[0] for k in boolq if "/" in k} == {"boolq"}
    assert boolq["boolq/generation"] == scores["1.0"]["details"]["boolq/generation"]

    questions = json.loads((tiny_suite / "boolq" / "test.json").read_text())
    inputs = tmp_path / "questions.jsonl"
    inputs.write_text("".join(json.dumps({"instruction": q["instruction"], "task": "boolq"}) + "\n" for q in questions))
    assert main(["predict", "--run", str(run), "--tier", "1.0", "--input", str(inputs),
                 "--output", str(tmp_path / "p.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == [q["instruction"] for q in questions]
    assert all(r["answer"] in ("true", "false", None) for r in rows)
    right = sum(r["answer"] == q["answer"] for r, q in zip(rows, questions)) / len(questions)
    assert right == scores["1.0"]["details"]["boolq/generation"]

    inputs.write_text(json.dumps({"input": "no instruction"}) + "\n")
    assert main(["predict", "--run", str(run), "--tier", "1.0", "--input", str(inputs),
                 "--output", str(tmp_path / "p2.jsonl")]) == 2
    assert "input record 1 has no 'instruction'" in capsys.readouterr().err
