"""The round engine end to end on a tiny backbone, aggregation, partitions, determinism, CLI errors."""

import numpy as np
import pytest
import torch

from ubsmoe.cli import main
from ubsmoe.config import load_config
from ubsmoe.data.partition import dirichlet_partition, iid_partition
from ubsmoe.engine.population import client_budgets, sample_clients
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.methods.base import ClientInfo, ClientUpdate, FederatedMethod, ServerState, top_k_for_budget

from tiny_experiment import tiny_overrides


@pytest.mark.parametrize("method", ["smoe", "fedavg-lora"])
def test_two_clients_two_rounds_end_to_end(tiny_bert, tiny_task, method):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method=method)

    results = run_experiment(config, show_progress=False)

    assert results.method == method
    assert [h.round for h in results.history] == [1, 2]
    assert set(results.final.tier_accuracy) == {"0.5", "1.0"}
    for acc in results.final.tier_accuracy.values():  # a share of the 24 test texts
        assert acc * results.num_test == pytest.approx(round(acc * results.num_test))
    assert results.final.average_accuracy == pytest.approx(np.mean(list(results.final.tier_accuracy.values())))
    assert results.num_train + results.num_test == 120
    assert sum(c.num_examples for c in results.clients) == results.num_train
    assert results.config["method"]["name"] == method
    losses = [c.train_loss for h in results.history for c in h.clients]
    assert all(np.isfinite(losses)) and len(losses) == 4
    if method == "smoe":
        assert results.k_max == 4
        load = results.final.tier_expert_load["0.5"]  # K = 2 of 4: two experts per token
        assert np.allclose(np.sum(load, axis=1), 2.0)
        # 8 x 16 tokens a step reach every expert of both layers: the K = 2 client trained all of them
        assert [c.experts_routed for h in results.history for c in h.clients] == [1.0] * 4
    else:
        assert results.k_max == 1
        assert [c.experts_routed for h in results.history for c in h.clients] == [None] * 4  # no routing


def test_training_learns_the_tiny_task(tiny_bert, tiny_task):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{"federation.rounds": 4,
                                                                           "train.local_steps": 8}), method="smoe")
    results = run_experiment(config, show_progress=False)
    first, last = results.history[0], results.history[-1]
    assert last.test_loss < first.test_loss
    assert last.average_accuracy > 0.6  # chance is 1/3


def test_same_seed_gives_the_same_numbers(tiny_bert, tiny_task):
    runs = [run_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method="smoe"),
                           show_progress=False) for _ in range(2)]
    assert without_timings(runs[0].to_json()["history"]) == without_timings(runs[1].to_json()["history"])
    assert runs[0].history[0].cost.clients[0].train_flops > 0  # the counted parts are compared


def without_timings(value):
    """The value with every measured wall time (keys mentioning seconds) removed, recursively."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def test_fedavg_aggregation_is_the_example_weighted_mean_of_deltas():
    state = ServerState(params={"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.0])})
    updates = [
        ClientUpdate(ClientInfo(0, 1.0, 30), {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([1.0])}),
        ClientUpdate(ClientInfo(1, 0.5, 10), {"w": torch.tensor([-1.0, 4.0]), "b": torch.tensor([-3.0])}),
    ]

    new = FederatedMethod(None, k_max=1).aggregate(state, updates)

    # w + (30 * [3, 0] + 10 * [-1, 4]) / 40 = [1, 2] + [2, 1]; b + (30 * 1 - 10 * 3) / 40 = 0
    assert torch.equal(new.params["w"], torch.tensor([3.0, 3.0]))
    assert torch.equal(new.params["b"], torch.tensor([0.0]))


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_split_covers_every_sample_exactly_once(alpha):
    labels = [i % 5 for i in range(503)]
    parts = dirichlet_partition(labels, 7, alpha, seed=3)
    merged = np.sort(np.concatenate(parts))
    assert np.array_equal(merged, np.arange(503))
    assert all(len(p) >= 1 for p in parts)


def test_small_alpha_skews_labels_more_than_large_alpha():
    labels = [i % 5 for i in range(1000)]

    def skew(alpha):
        parts = dirichlet_partition(labels, 5, alpha, seed=0)
        return np.mean([np.bincount(np.asarray(labels)[p], minlength=5).max() / len(p) for p in parts])

    assert skew(0.1) > skew(100.0) + 0.3


def test_iid_split_is_balanced_and_complete():
    parts = iid_partition(10, 3, seed=0)
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(10))


def test_budgets_round_robin_and_k_per_budget():
    config = load_config(overrides=["federation.num_clients=6"]).federation
    assert client_budgets(config) == [0.25, 0.5, 0.75, 1.0, 0.25, 0.5]
    assert [top_k_for_budget(8, b) for b in (0.25, 0.5, 0.75, 1.0)] == [2, 4, 6, 8]
    assert top_k_for_budget(2, 0.25) == 1


def test_client_sampling_takes_the_configured_fraction_reproducibly():
    clients = [ClientInfo(i, 1.0, 1) for i in range(10)]
    first = sample_clients(clients, 0.3, round_index=1, seed=0)
    assert len(first) == 3
    assert first == sample_clients(clients, 0.3, round_index=1, seed=0)


@pytest.mark.parametrize("argv, message", [
    (["run", "federation.roundz=3"], "unknown config key 'federation.roundz'"),
    (["run", "federation.rounds=three"], "expected a value of type int"),
    (["run", "rounds"], "not of the form key=value"),
    (["run", "--method", "nope"], "unknown method 'nope'"),
    (["run", "method.temperature=0.5"], "unknown config key 'method.temperature'"),
    (["run", "--method", "smoe", "method.zeta=0.5"], "unknown config key 'method.zeta'"),
])
def test_bad_settings_exit_with_code_2_and_say_why(argv, message, capsys, tmp_path):
    code = main(argv + ["--out", str(tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("method.zeta=2", "method.zeta must be in [0, 1], got 2.0"),
    ("model.num_experts=5", "into 5 equal experts: choose model.num_experts dividing 64"),
    ("data.dataset=nowhere.csv", "data file nowhere.csv does not exist"),
    ("task=classifier", "unknown task 'classifier'; registered tasks"),
    ("federation.num_clients=500", "samples cannot give 500 clients"),
    ("train.eval_batch_size=0", "train.eval_batch_size must be >= 1"),
    ("model.calibration_samples=0", "model.calibration_samples must be >= 1 with router_init=calibrated"),
    ("data.max_train_samples=-5", "data.max_train_samples and data.max_test_samples must be >= 0"),
    ("model.max_length=200", "model.max_length=200 exceeds the 128 positions"),
])
def test_user_errors_found_while_building_exit_2_in_one_line(tiny_bert, tiny_task, tmp_path, capsys, override, message):
    code = main(["run", "--quiet", "--out", str(tmp_path), *tiny_overrides(tiny_bert, tiny_task), override])

    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_unusable_output_folder_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ubsmoe.engine.rounds.run_experiment", lambda *a, **k: pytest.fail("it trained"))
    (tmp_path / "a-file").write_text("")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "results.json").write_text("{}")

    assert main(["run", "--quiet", "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["run", "--quiet", "--out", str(tmp_path / "done")]) == 2
    assert "holds a finished run (results.json): choose another --out, or pass --force" in capsys.readouterr().err


def test_a_bug_is_not_taken_for_a_user_error(monkeypatch, tmp_path):
    """Regression: the CLI caught every KeyError and ValueError as a user error, hiding bugs' tracebacks."""
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("ubsmoe.engine.rounds.run_experiment", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["run", "--quiet", "--out", str(tmp_path)])


def test_bad_key_in_config_file_exits_with_code_2(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text("[federation]\nrounds = 2\nclients = 3\n")
    assert main(["run", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "unknown config key 'federation.clients'" in capsys.readouterr().err


def test_config_file_values_are_applied(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text("seed = 4\n[federation]\nrounds = 2\nbudgets = [0.5, 1]\n[method]\nname = \"fedavg-lora\"\n")
    config = load_config(path, overrides=["federation.rounds=3"])
    assert (config.seed, config.federation.rounds, config.federation.budgets, config.method_name) == (4, 3, [0.5, 1.0], "fedavg-lora")


def test_methods_command_lists_registered_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "smoe" in out and "fedavg-lora" in out


def test_backbone_dropout_can_be_set(tiny_bert, tiny_task):
    from ubsmoe.engine.experiment import build_experiment

    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{"model.dropout": 0.3}), method="smoe")
    model = build_experiment(config).model
    probabilities = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert probabilities == {0.3}
    default = build_experiment(load_config(overrides=tiny_overrides(tiny_bert, tiny_task), method="smoe")).model
    assert {m.p for m in default.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}  # the tiny checkpoint's
