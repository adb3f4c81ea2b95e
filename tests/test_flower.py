"""ubsmoe on Flower: the simulation engine gives the in-process engine's numbers (the same server and
client code, the records carried as Flower messages between processes), and the strategy drops
failed and non-finite replies, records them, and stops a round with fewer than min_clients updates."""

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is the optional extra ubsmoe[flower]")
pytest.importorskip("ray", reason="Flower's simulation needs flwr[simulation] (Ray)")

from tiny_experiment import tiny_overrides  # noqa: E402
from ubsmoe.cli import main  # noqa: E402
from ubsmoe.config import load_config  # noqa: E402
from ubsmoe.engine.client_round import run_client  # noqa: E402
from ubsmoe.engine.flower.messages import (CLIENT_FAULT, instruction_content, read_instruction, read_update,  # noqa: E402
                                          update_content)
from ubsmoe.engine.flower.strategy import MethodStrategy  # noqa: E402
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.engine.server import Server  # noqa: E402
from ubsmoe.engine.run_folder import read_results

from test_client_server import deterministic  # noqa: E402


@pytest.fixture(autouse=True)
def flower_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setenv("UBSMOE_UPCYCLE_CACHE", str(tmp_path / "upcycle-cache"))


FOUR_CLIENTS = {"federation.num_clients": 4, "federation.budgets": "0.25,0.5,0.75,1.0", "federation.rounds": 2,
                "threads": 1, "model.dropout": 0.1}


@pytest.mark.parametrize("method, fraction", [("ubsmoe", 1.0), ("hetlora", 1.0), ("flora", 0.5)])
def test_flower_simulation_gives_the_in_process_numbers(tiny_bert, tiny_task, tmp_path, method, fraction):
    """4 clients x 2 rounds; FLoRA with half of them per round (its clients rebuild the merged base). The
    tolerance is zero: both engines run the same server and client code with the same seeds, and the
    records cross Flower bit for bit (safetensors-exact arrays, JSON-exact scalars), so any difference
    is a bug. UB-SMoE goes through the CLI, which writes results.json as ``ubsmoe run`` does."""
    overrides = tiny_overrides(tiny_bert, tiny_task, **FOUR_CLIENTS, **{"federation.fraction_fit": fraction})
    config = load_config(overrides=overrides, method=method)
    if method == "ubsmoe":
        out = tmp_path / "flower"
        assert main(["run", "--engine", "flower-sim", "--quiet", "--method", method, "--out", str(out)] + overrides) == 0
        flower = read_results(out)
    else:
        from ubsmoe.engine.flower.simulation import run_flower_simulation

        flower = run_flower_simulation(config, show_progress=False)
    in_process = run_experiment(config, show_progress=False)

    assert flower.engine == "flower-sim"
    assert deterministic(flower) == deterministic(in_process)
    assert flower.round0 == in_process.round0
    assert ray_processes_end(within_s=30)
    if method == "ubsmoe":  # the run's checkpoint, history and saved model, as the in-process engine writes them
        from ubsmoe.engine.evaluation import evaluate
        from ubsmoe.engine.saved_model import load_model

        assert (out / "checkpoint.safetensors").is_file()
        assert len(json.loads((out / "history.json").read_text())) == 2
        loaded = load_model(out)
        loaded.setup_tier(0.25)
        scores = evaluate(loaded.experiment.model, loaded.experiment.task, loaded.experiment.test, 64)
        assert scores.accuracy == flower.final.tier_accuracy["0.25"]


def ray_processes_end(within_s: float) -> bool:
    """Whether every Ray process of the simulation is gone within ``within_s`` (they exit asynchronously)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if not [line for line in os.popen("ps -eo args").read().splitlines()
                if line.startswith("ray::") or "/raylet" in line or "gcs_server" in line]:
            return True
        time.sleep(0.5)
    return False


def reply(to: str, content=None, error: str | None = None, node: int = 1, code: int = CLIENT_FAULT):
    """What the strategy reads of a Flower reply to the message with id ``to`` (node 1: the SuperLink
    answers for a node gone offline); an error reply says a client did not deliver unless ``code`` says
    its code raised."""
    return SimpleNamespace(metadata=SimpleNamespace(src_node_id=node, reply_to_message_id=to),
                           has_error=lambda: error is not None, error=SimpleNamespace(reason=error, code=code),
                           content=content)


def sent(instructions) -> list:
    """The strategy's outgoing messages as the grid leaves them: ids m0, m1, ... set when pushed."""
    return [(SimpleNamespace(metadata=SimpleNamespace(message_id=f"m{i}")), instruction)
            for i, instruction in enumerate(instructions)]


def test_strategy_drops_failed_replies_and_needs_min_clients(tiny_bert, tiny_task):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{
        "federation.num_clients": 3, "federation.budgets": "0.5,1.0,1.0", "threads": 1}))
    server = Server(config)
    strategy = MethodStrategy(server)
    strategy.node_of = {0: 100, 1: 101, 2: 102}
    instructions = server.open_round(1)
    strategy.outgoing = sent(instructions)
    runtime = server.experiment.client_runtime(server.flop_counter)
    good = run_client(runtime, read_instruction(instruction_content(instructions[0], config))[0])
    poisoned = run_client(runtime, instructions[1])
    name = next(iter(poisoned.delta))
    poisoned.delta[name] = poisoned.delta[name].clone().fill_(float("nan"))
    before = {n: v.clone() for n, v in server.state.params.items()}

    arrays, metrics = strategy.aggregate_train(1, [reply("m0", update_content(good), node=100),
                                                   reply("m1", update_content(poisoned), node=101),
                                                   reply("m7", error="a reply to another round's message"),
                                                   reply("m2", error="CUDA out of memory")])
    entry = server.evaluate(1)

    assert [(f.client_id, f.reason) for f in entry.failed_clients] == [
        (1, "the update holds NaN or infinite values"), (2, "CUDA out of memory")]
    assert [c.id for c in entry.clients] == [0]
    assert metrics["updates"] == 1 and metrics["failures"] == 2
    assert all(torch.isfinite(v).all() for v in server.state.params.values())
    assert any(not torch.equal(server.state.params[n], before[n]) for n in before)  # the good update counted
    assert torch.equal(read_update(update_content(good), server.method.Extras).delta[name], good.delta[name])

    strict = Server(load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{
        "federation.num_clients": 3, "federation.budgets": "0.5,1.0,1.0", "federation.min_clients": 2})))
    strategy = MethodStrategy(strict)
    strategy.outgoing = sent(strict.open_round(1))
    with pytest.raises(RuntimeError, match=r"1 of the sampled clients returned an update, fewer than federation.min_clients=2 .*client 1: node offline.*client 2: no reply"):
        strategy.aggregate_train(1, [reply("m0", update_content(good)), reply("m1", error="node offline")])


@pytest.mark.parametrize("policy", ["raise", "drop"])
def test_a_client_whose_code_raised_stops_the_run_with_its_traceback_unless_dropping(tiny_bert, tiny_task, policy):
    from flwr.common.constant import ErrorCode

    from ubsmoe.engine.errors import ClientBug

    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{"federation.on_client_error": policy}))
    server = Server(config)
    strategy = MethodStrategy(server)
    instructions = server.open_round(1)
    strategy.outgoing = sent(instructions)
    good = run_client(server.experiment.client_runtime(server.flop_counter), instructions[0])
    trace = 'Traceback (most recent call last):\n  File "smoe.py", line 3\nZeroDivisionError: division by zero'
    replies = [reply("m0", update_content(good)), reply("m1", error=trace, code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION)]

    if policy == "raise":
        with pytest.raises(ClientBug, match=r"(?s)round 1: client 1's code raised.*ZeroDivisionError: division by zero"):
            strategy.aggregate_train(1, replies)
    else:
        strategy.aggregate_train(1, replies)
        assert [(f.client_id, f.reason) for f in server.failures] == [(1, "ZeroDivisionError: division by zero")]


@pytest.mark.parametrize("policy", ["raise", "drop"])
def test_a_node_started_for_another_partition_stops_the_run_under_either_policy(tiny_bert, tiny_task, policy):
    """A misconfigured SuperNode is neither a client that failed to deliver nor a bug of its code."""
    from ubsmoe.engine.flower.messages import NODE_MISCONFIGURED

    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{"federation.on_client_error": policy}))
    server = Server(config)
    strategy = MethodStrategy(server)
    strategy.outgoing = sent(server.open_round(1))
    replies = [reply("m0", error="this node holds partition 1, not the instruction's client 0", code=NODE_MISCONFIGURED)]

    with pytest.raises(RuntimeError, match=r"round 1: the SuperNode of client 0 is misconfigured: this node holds "
                                           r"partition 1"):
        strategy.aggregate_train(1, replies)


def test_flower_engine_without_flower_installed_is_a_user_error(tiny_bert, tiny_task, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if flwr[simulation] were not installed
    code = main(["run", "--engine", "flower-sim", "--quiet", "--out", str(tmp_path / "x")]
                + tiny_overrides(tiny_bert, tiny_task))
    assert code == 2
    assert "pip install 'ubsmoe[flower]'" in capsys.readouterr().err
    assert not (tmp_path / "x" / "results.json").exists()


def test_the_repository_app_is_the_one_ubsmoe_flower_run_submits():
    from pathlib import Path

    from ubsmoe.engine.flower.deployment import APP_PYPROJECT

    assert (Path(__file__).parents[1] / "deploy" / "flower" / "pyproject.toml").read_text() == APP_PYPROJECT


def test_bench_flower_overhead_measures_both_engines(tiny_bert, tiny_task, tmp_path):
    """The benchmark's command with key=value settings after its options: both engines run, the numbers
    agree, and the ratio is the two wall times' quotient."""
    out = tmp_path / "flower_overhead.json"
    assert main(["bench", "flower-overhead", "--threads", "1", "--out", str(out)]
                + tiny_overrides(tiny_bert, tiny_task)) == 0
    result = json.loads(out.read_text())
    assert result["same_numbers"] is True
    assert result["time_ratio"] == pytest.approx(result["flower_sim_s"] / result["inprocess_s"])
    assert result["inprocess_s"] > 0 and result["clients"] == 2
    assert "time_ratio (Flower / in-process)" in out.with_suffix(".md").read_text()


def test_a_killed_flower_simulation_resumes_to_the_uninterrupted_numbers(tiny_bert, tiny_task, tmp_path):
    """The server process killed (SIGKILL) during round 3's evaluation; `ubsmoe run --resume --engine
    flower-sim` continues from round 2's checkpoint and ends with the numbers of a run never stopped."""
    import signal
    import subprocess
    import sys

    from ubsmoe.engine.checkpoint import read_checkpoint

    overrides = tiny_overrides(tiny_bert, tiny_task, **(FOUR_CLIENTS | {"federation.rounds": 3}))
    out = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "ubsmoe"), "run", "--quiet", "--engine", "flower-sim", "--method",
               "smoe", "--out", str(out)] + overrides
    killed = subprocess.Popen(command, env=os.environ | {"UBSMOE_FAULT": "kill:evaluate:3"}, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = killed.communicate(timeout=600)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(killed.pid, signal.SIGKILL)  # the simulation's Ray processes with it
    assert killed.returncode == -9, err.decode()[-2000:]
    assert read_checkpoint(out).round == 2 and ray_processes_end(within_s=60)

    assert main(["run", "--quiet", "--engine", "flower-sim", "--resume", str(out)]) == 0

    resumed = read_results(out)
    uninterrupted = run_experiment(load_config(overrides=overrides, method="smoe"), show_progress=False)
    assert deterministic(resumed) == deterministic(uninterrupted)
    assert resumed.round0 == uninterrupted.round0 and ray_processes_end(within_s=30)
