"""Durable runs: a run killed (SIGKILL) during local training, aggregation, evaluation or the writing of
its checkpoint, and resumed with ``ubsmoe run --resume``, ends with exactly the numbers of an
uninterrupted run; damaged checkpoints, another config and a folder holding an unfinished run are
user errors (exit 2) that name the fix."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_experiment import tiny_overrides
from ubsmoe.cli import main
from ubsmoe.config import load_config
from ubsmoe.engine.checkpoint import CHECKPOINT, read_checkpoint, write_checkpoint
from ubsmoe.engine.client_round import run_client
from ubsmoe.engine.server import Server, instruction_for
from ubsmoe.methods import REGISTRY
from ubsmoe.methods.records import flat_scalars, flat_tensors
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.engine.run_folder import read_results

from test_client_server import deterministic

UBSMOE = str(Path(sys.executable).parent / "ubsmoe")
THREE_ROUNDS = {"federation.rounds": 3, "threads": 1, "model.dropout": 0.1}


def killed_run(out: Path, overrides: list[str], fault: str, method: str) -> subprocess.CompletedProcess:
    """``ubsmoe run`` in its own process, which kills itself (SIGKILL) at ``fault`` (phase:round)."""
    return subprocess.run([UBSMOE, "run", "--quiet", "--method", method, "--out", str(out)] + overrides,
                          env=os.environ | {"UBSMOE_FAULT": f"kill:{fault}"}, capture_output=True, timeout=600)


@pytest.mark.parametrize("method, fault, resumes_after", [
    ("ubsmoe", "train:2", 1),  # after the first client of round 2 trained
    ("ubsmoe", "aggregate:3", 2),  # after round 3's aggregation, before its evaluation
    ("ubsmoe", "evaluate:1", None),  # during round 1's evaluation: no checkpoint yet
    ("ubsmoe", "checkpoint:2", 1),  # the round-2 checkpoint written but not yet in place
    ("flora", "train:3", 2),  # the merged base rebuilt from the checkpoint's records
    ("a3smoe", "aggregate:2", 1),  # the per-K scales
])
def test_a_killed_run_resumes_to_the_uninterrupted_numbers(tiny_bert, tiny_task, tmp_path, method, fault, resumes_after):
    overrides = tiny_overrides(tiny_bert, tiny_task, **THREE_ROUNDS)
    out = tmp_path / "run"

    killed = killed_run(out, overrides, fault, method)

    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert not (out / "results.json").exists()
    if resumes_after is None:
        assert not (out / CHECKPOINT).exists()
        assert main(["run", "--quiet", "--method", method, "--out", str(out)] + overrides) == 0  # starts anew
    else:
        assert read_checkpoint(out).round == resumes_after
        assert len(json.loads((out / "history.json").read_text())) == resumes_after
        assert main(["run", "--quiet", "--resume", str(out)]) == 0
    resumed = read_results(out)
    uninterrupted = run_experiment(load_config(overrides=overrides, method=method), show_progress=False)
    assert deterministic(resumed) == deterministic(uninterrupted)
    assert resumed.round0 == uninterrupted.round0
    assert not list(out.glob(".*.partial"))


@pytest.fixture
def unfinished(tiny_bert, tiny_task, tmp_path):
    """A run killed after round 1's checkpoint."""
    overrides = tiny_overrides(tiny_bert, tiny_task, **THREE_ROUNDS)
    out = tmp_path / "run"
    assert killed_run(out, overrides, "train:2", "ubsmoe").returncode == -9
    return out, overrides


def test_resume_refuses_another_config_and_a_fresh_run_refuses_the_folder(unfinished, capsys):
    out, overrides = unfinished
    assert main(["run", "--quiet", "--resume", str(out)] + overrides + ["model.lora_rank=2", "train.lr=0.5"]) == 2
    assert "would change the run's numbers: model.lora_rank, train.lr;" in capsys.readouterr().err
    assert main(["run", "--quiet", "--out", str(out)] + overrides) == 2
    assert f"continue it with --resume {out}" in capsys.readouterr().err
    assert read_checkpoint(out).round == 1  # nothing lost
    assert main(["run", "--quiet", "--force", "--out", str(out)] + overrides) == 0  # --force starts over
    assert read_checkpoint(out).round == 3


def test_a_damaged_checkpoint_is_reported_not_trusted(unfinished, capsys):
    out, _ = unfinished
    data = (out / CHECKPOINT).read_bytes()
    (out / CHECKPOINT).write_bytes(data[: len(data) // 2])  # cut short
    assert main(["run", "--quiet", "--resume", str(out)]) == 2
    error = capsys.readouterr().err
    assert "checkpoint.safetensors is damaged" in error and "--force" in error


def test_compare_resumes_an_interrupted_run(unfinished, tiny_bert, tiny_task, monkeypatch):
    import ubsmoe.engine.rounds as simulation
    from ubsmoe.report.compare import run_comparison

    out, overrides = unfinished
    folder = out.parent / "compare" / "ubsmoe-s0"
    folder.parent.mkdir()
    out.rename(folder)
    real = simulation.run_client

    def no_round_1_again(runtime, instruction, progress=None):  # round 1 is in the checkpoint
        assert instruction.round > 1, "the comparison ran the run again from the start"
        return real(runtime, instruction, progress)

    monkeypatch.setattr(simulation, "run_client", no_round_1_again)
    run_comparison(["ubsmoe"], [0], folder.parent, overrides=overrides, show_progress=False)
    monkeypatch.setattr(simulation, "run_client", real)

    resumed = read_results(folder)
    uninterrupted = run_experiment(load_config(overrides=overrides), show_progress=False)
    assert deterministic(resumed) == deterministic(uninterrupted)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_methods_state_comes_back_from_a_checkpoint_as_it_was_written(tiny_bert, tiny_task, tmp_path, method):
    """After a round, each method's typed state (ranks, SVDs, scales, merged rounds, ...) is written and read
    back: the same tensors and scalars, the same report on it, the same instruction for every client."""
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{"threads": 1}), method=method)
    server = Server(config)
    runtime = server.experiment.client_runtime(server.flop_counter)
    server.close_round(1, {i.client.client_id: run_client(runtime, i)
                           for i in server.open_round(1)})

    write_checkpoint(tmp_path, server.checkpoint(1))
    back = read_checkpoint(tmp_path)

    for flat in (flat_tensors, flat_scalars):
        written, read = flat(server.state), flat(back.state)
        assert written.keys() == read.keys()
        assert all(torch.equal(v, read[k]) if isinstance(v, torch.Tensor) else v == read[k] for k, v in written.items())
    assert type(back.state.method) is type(server.state.method)
    assert server.method.round_report(back.state) == server.method.round_report(server.state)
    for client in server.experiment.clients:
        sent, resent = (flat_tensors(instruction_for(server.method, s, client, 2)) for s in (server.state, back.state))
        assert sent.keys() == resent.keys() and all(torch.equal(v, resent[k]) for k, v in sent.items())


def test_a_checkpoint_of_an_earlier_version_says_so(tmp_path, capsys):
    from ubsmoe.storage import write_tensors

    write_tensors(tmp_path / CHECKPOINT, {"params/w": torch.zeros(2)}, {"ubsmoe": json.dumps(
        {"format": 2, "round": 1, "scalars": {}, "history": [], "round0": {}, "config": {}, "runtime_s": 1.0})})

    assert main(["run", "--quiet", "--resume", str(tmp_path)]) == 2
    assert "was written by an earlier version of ubsmoe (format 2; this one reads format 3)" in capsys.readouterr().err
