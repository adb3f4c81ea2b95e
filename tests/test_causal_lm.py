"""The causal-LM task on a tiny random Llama: loss mask, truncation, the restricted vocabulary projection,
log-likelihood scoring and cached greedy generation against brute force, every method end to end."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from tiny_experiment import assert_every_client_answered, causal_overrides
from ubsmoe.config import ConfigError, load_config
from ubsmoe.data.commonsense import load_commonsense
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.methods import REGISTRY
from ubsmoe.model import load_tokenizer
from ubsmoe.tasks.commonsense_encoding import IGNORE, encode_questions, encode_training, next_token_positions
from ubsmoe.tasks.commonsense_scoring import score_and_generate


@pytest.fixture(scope="module")
def experiment(tiny_causal_llama, tiny_suite):
    exp = build_experiment(load_config(overrides=causal_overrides(tiny_causal_llama, tiny_suite), method="smoe"))
    exp.model.load_trainable_state(exp.method.initial_state(exp.model).params)
    for layer in exp.model.moe_layers:  # a random, non-zero update so that the checks see the experts' LoRA
        layer.lora_up_b.data.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a random model's attention barely mixes tokens: scale it up so that history matters
        for name, module in exp.model.backbone.named_modules():
            if name.endswith(("q_proj.base", "k_proj", "v_proj.base", "o_proj")) and hasattr(module, "weight"):
                module.weight.mul_(8.0)
    exp.model.set_top_k(2)
    exp.model.eval()
    return exp


def test_only_the_response_carries_loss_and_long_prompts_lose_their_left(tiny_causal_llama, tiny_suite):
    tokenizer = load_tokenizer(str(tiny_causal_llama))
    example = load_commonsense(tiny_suite).train["boolq"][1]
    prompt = tokenizer(example.prompt)["input_ids"]
    response = tokenizer(example.response(), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    data = encode_training(tokenizer, [example], max_length=64, train_on_inputs=False)
    everything = encode_training(tokenizer, [example], max_length=64, train_on_inputs=True)
    short = encode_training(tokenizer, [example], max_length=len(response) + 5, train_on_inputs=False)

    length = len(prompt) + len(response)
    assert data.input_ids[0, :length].tolist() == prompt + response
    assert data.labels[0, :length].tolist() == [IGNORE] * len(prompt) + response  # "the correct answer is false </s>"
    assert (data.labels[0, length:] == IGNORE).all() and data.attention_mask[0].sum() == length
    assert everything.labels[0, :length].tolist() == prompt + response
    kept = short.input_ids[0].tolist()
    assert kept[0] == tokenizer.bos_token_id and kept[1:5] == prompt[-4:] and kept[5:] == response


def test_restricted_projection_gives_the_loss_of_the_full_one(experiment):
    batch = experiment.train.batch(torch.arange(4))

    restricted = experiment.task.loss(experiment.model, batch)
    hidden = experiment.model.hidden_states(batch.input_ids, batch.attention_mask)
    full_logits = hidden @ experiment.model.head.weight.T  # (B, S, V): every position
    full = F.cross_entropy(full_logits[:, :-1].reshape(-1, full_logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE)

    torch.testing.assert_close(restricted, full, rtol=1e-6, atol=1e-6)
    positions, _ = next_token_positions(batch.labels)
    assert experiment.model.head.last_positions == int(positions.sum()) < batch.attention_mask.sum()


def brute_force_next_token_log_probs(model, sequence: list[int]) -> torch.Tensor:
    """log p(next token | tokens up to i) for every position i of one unpadded sequence, no cache: (S, V)."""
    ids = torch.tensor([sequence])
    hidden = model.hidden_states(ids, torch.ones_like(ids))[0]
    return (hidden @ model.head.weight.T).log_softmax(-1)


def test_one_prompt_pass_scores_choices_and_generates_as_brute_force_does(experiment):
    """Batched, left-padded, cached (one prompt pass, repeated per choice, cut back, then decoded) against
    every choice and every generated token computed from the whole unpadded sequence."""
    questions = [q for qs in experiment.test.questions.values() for q in qs][:5]
    questions[1] = replace(questions[1], prompt=questions[1].prompt[:-5])  # different lengths: left padding

    answers = score_and_generate(experiment.model, questions, batch_size=4, max_new_tokens=5, eos=-1, pad=0)

    for question, answer in zip(questions, answers):
        for response, score in zip(question.responses, answer.scores):
            log_probs = brute_force_next_token_log_probs(experiment.model, question.prompt + response)
            expected = sum(log_probs[len(question.prompt) - 1 + i, t].item() for i, t in enumerate(response))
            assert score == pytest.approx(expected, abs=1e-4)
        sequence = list(question.prompt)
        for _ in range(5):
            sequence.append(int(brute_force_next_token_log_probs(experiment.model, sequence)[-1].argmax()))
        assert answer.generated == sequence[len(question.prompt):]
    assert len({tuple(a.scores) for a in answers}) > 1


def test_questions_keep_their_responses_whole(tiny_causal_llama, tiny_suite):
    tokenizer = load_tokenizer(str(tiny_causal_llama))
    suite = load_commonsense(tiny_suite)

    test = encode_questions(tokenizer, {"ARC-Easy": suite.test["ARC-Easy"][:2]}, max_length=20, max_new_tokens=6)

    question = test.questions["ARC-Easy"][0]
    assert len(question.prompt) + max(len(r) for r in question.responses) <= 20
    assert question.prompt[0] == tokenizer.bos_token_id
    assert [tokenizer.decode(r) for r in question.responses] == ["the correct answer is answer1",
                                                                "the correct answer is answer2",
                                                                "the correct answer is answer3"]
    assert test.chance("ARC-Easy") == pytest.approx(1 / 3)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_method_fine_tunes_the_causal_lm_end_to_end(tiny_causal_llama, tiny_suite, method):
    config = load_config(overrides=causal_overrides(tiny_causal_llama, tiny_suite), method=method)

    results = run_experiment(config, show_progress=False)

    final = results.final
    details = results.history[-1].tier_details["0.5"]
    assert results.task == "causal-lm" and results.label_names == ["ARC-Easy", "boolq"]
    assert results.num_test == 3 * 4  # 4 questions from each of the three tasks, the test-only one included
    assert {k.split("/")[0] for k in details if "/" in k} == {"ARC-Easy", "boolq", "winogrande"}
    assert final.tier_accuracy["0.5"] == details["generation"]  # the headline protocol
    assert details["winogrande/chance"] == 0.5 and details["chance"] == pytest.approx((1 / 3 + 0.5 + 0.5) / 3)
    assert all(0 <= v <= 1 for k, v in details.items() if not k.endswith(("questions", "generated")))
    assert details["questions"] == details["generated"] == 12  # every question scored and generated
    assert math.isfinite(final.test_loss) and set(results.round0) == {"0.5", "1.0"}
    assert all(math.isfinite(c.train_loss) for c in results.history[-1].clients)
    assert sum(sum(c.label_counts) for c in results.clients) == results.num_train == 48
    assert_every_client_answered(results)


def test_tiers_benchmark_times_the_causal_lm_step(tiny_causal_llama, tiny_suite, tmp_path):
    """`ubsmoe bench tiers ... task=causal-lm data.dataset=commonsense:PATH` times and counts the causal-LM step."""
    from ubsmoe.bench.tiers import run

    result = run(tmp_path / "tiers.json", methods=("ubsmoe",), backbone=str(tiny_causal_llama), batch_size=4,
                 max_length=64, repeats=1, part_repeats=1, threads=1,
                 overrides=("task=causal-lm", f"data.dataset=commonsense:{tiny_suite}", "model.num_experts=4",
                            "model.calibration_samples=8", "data.max_test_samples=2"))

    tiers = result["methods"]["ubsmoe"]["tiers"]
    assert result["overrides"][0] == "task=causal-lm"
    assert tiers["0.25"]["train_flops"] < tiers["1.0"]["train_flops"]
    made_by = next(line for line in (tmp_path / "tiers.md").read_text().splitlines() if line.startswith("Made by"))
    assert "`ubsmoe bench tiers --backbone " in made_by and " task=causal-lm data.dataset=commonsense:" in made_by


def test_an_encoder_backbone_or_an_unknown_task_is_refused_before_training(tiny_bert, tiny_suite):
    encoder = load_config(overrides=causal_overrides(tiny_bert, tiny_suite), method="smoe")
    unknown = load_config(overrides=causal_overrides(tiny_bert, tiny_suite, task="causal_lm"), method="smoe")
    wrong_data = load_config(overrides=causal_overrides(tiny_bert, tiny_suite, **{"data.dataset": "bbc_news"}),
                             method="smoe")

    with pytest.raises(ConfigError, match="task causal-lm needs a decoder"):
        build_experiment(encoder)
    with pytest.raises(ConfigError, match="unknown task 'causal_lm'; registered tasks: causal-lm, classification"):
        build_experiment(unknown)
    with pytest.raises(ConfigError, match="reads data.dataset=commonsense:PATH"):
        build_experiment(wrong_data)


def brute_force_beam_search(model, prompt: list[int], steps: int, eos: int, n: int) -> tuple[list[int], int]:
    """Beam search as Hugging Face's (length penalty 1, no early stopping) on one unpadded prompt, every
    step from the whole sequence -> (the answer, how many continuations finished)."""
    open_beams, finished, ended = [(0.0, [])], [], 0
    for step in range(steps):
        candidates = []
        for score, tokens in open_beams:
            log_probs = brute_force_next_token_log_probs(model, prompt + tokens)[-1]
            best = log_probs.topk(2 * n)
            candidates += [(score + v, tokens + [t]) for v, t in zip(best.values.tolist(), best.indices.tolist())]
        candidates.sort(key=lambda c: -c[0])
        kept = []
        for rank, (score, tokens) in enumerate(candidates[: 2 * n]):
            if tokens[-1] == eos:
                if rank < n:
                    finished = sorted(finished + [(score / (step + 1), tokens)], key=lambda h: -h[0])[:n]
                    ended += 1
            elif len(kept) < n:
                kept.append((score, tokens))
        open_beams = kept
        if len(finished) >= n and min(f[0] for f in finished) >= kept[0][0] / (step + 1):
            return max(finished, key=lambda h: h[0])[1], ended
    hypotheses = sorted(finished + [(s / len(t), t) for s, t in open_beams], key=lambda h: -h[0])[:n]
    return hypotheses[0][1], ended


@pytest.mark.parametrize("eos_is_likely", [False, True])
def test_beam_search_with_the_cache_equals_beam_search_on_whole_sequences(experiment, eos_is_likely):
    questions = [q for qs in experiment.test.questions.values() for q in qs][:3]
    questions[1] = replace(questions[1], prompt=questions[1].prompt[:-4])  # left padding in the batch
    # an end-of-sequence token among the likely ones exercises the continuations set aside
    eos = int(brute_force_next_token_log_probs(experiment.model, questions[0].prompt)[-1].argmax()) \
        if eos_is_likely else -1

    answers = score_and_generate(experiment.model, questions, batch_size=3, max_new_tokens=6, eos=eos, pad=0,
                                 num_beams=3)

    set_aside = 0
    for question, answer in zip(questions, answers):
        expected, ended = brute_force_beam_search(experiment.model, question.prompt, 6, eos, 3)
        assert answer.generated == expected
        set_aside += ended
    assert (set_aside > 0) == eos_is_likely


def test_generation_on_a_subset_keeps_every_scored_question_and_counts_the_format(experiment, monkeypatch):
    """With evaluation.generate_questions=2, every question is scored by log-likelihood as before and only a
    seeded 2 per task generate; the format rate counts generations that name any choice of the pattern."""
    import ubsmoe.tasks.commonsense_scoring as commonsense_scoring

    task = experiment.task
    everything = task.evaluate(experiment.model, experiment.test, 8)
    task.config = replace(task.config, evaluation=replace(task.config.evaluation, generate_questions=2))
    decoded = iter(["answer2 it is", "option1", "the correct answer is true", "no idea", "xyz", "answer9"])
    monkeypatch.setattr(task.tokenizer, "batch_decode", lambda ids, **k: [next(decoded) for _ in ids])
    try:
        subset = task.evaluate(experiment.model, experiment.test, 8)
    finally:
        task.config = replace(task.config, evaluation=replace(task.config.evaluation, generate_questions=0))

    details = subset.details
    for name in experiment.test.questions:
        assert details[f"{name}/loglik"] == everything.details[f"{name}/loglik"]  # all scored, as before
        assert (details[f"{name}/questions"], details[f"{name}/generated"]) == (4, 2)
    # tasks in order, two generations each: ARC-Easy finds answer2 and nothing in "option1"; boolq "true" and
    # nothing in "no idea"; winogrande nothing in "xyz" ("answer9" names no option either)
    assert [details[f"{t}/format"] for t in ("ARC-Easy", "boolq", "winogrande")] == [0.5, 0.5, 0.0]
    assert details["questions"] == 12 and details["generated"] == 6
    assert commonsense_scoring.generation_subset(4, 2, "0/boolq") == commonsense_scoring.generation_subset(4, 2, "0/boolq")


def test_majority_and_chance_baselines_by_hand(experiment):
    data = experiment.test
    for task, questions in data.questions.items():
        answers = [q.choices[q.answer] for q in questions]
        assert data.majority(task) == max(answers.count(a) for a in set(answers)) / len(answers)
        assert data.chance(task) == pytest.approx(sum(1 / len(q.choices) for q in questions) / len(questions))
