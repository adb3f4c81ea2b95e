"""Failing clients in the in-process engine (as on Flower): a client that did not deliver (its transport
reports a ``ClientFault``, its training diverged), returns non-finite or wrongly shaped tensors, or sends
deltas it was not sent is left out of that round's aggregation and recorded in results.json (client,
reason, in its round's entry); a client whose code raises stops the run with its traceback unless
federation.on_client_error=drop; fewer than federation.min_clients
updates stop the run with a message naming every failure; updates beyond federation.max_update_norm
are clipped or rejected."""


import time

import pytest
import torch

from tiny_experiment import tiny_overrides
from ubsmoe.cli import main
from ubsmoe.config import load_config
from ubsmoe.engine.client_round import run_client
from ubsmoe.engine.errors import ClientFault
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.engine.server import Server
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.engine.run_folder import read_results
from ubsmoe.engine.run_records import FailedClient

THREE = {"federation.num_clients": 3, "federation.budgets": "0.5,1.0,1.0", "threads": 1}


def faulty_client(config, faults: dict[tuple[int, int], str]):
    """A client_fn that runs the real client and then breaks the update of (round, client) as ``faults`` says."""
    exp = build_experiment(config)
    runtime = exp.client_runtime(FlopCounter(exp.model))

    def client_fn(instruction, progress):
        fault = faults.get((instruction.round, instruction.client.client_id))
        if fault == "raise":  # what a transport reports for a client that did not deliver
            raise ClientFault("the device fell off the network")
        update = run_client(runtime, instruction, progress)
        name = next(iter(update.delta))
        if fault == "nan":
            update.delta[name] = torch.full_like(update.delta[name], float("nan"))
        elif fault == "shape":
            update.delta[name] = update.delta[name].reshape(-1)[:-1]
        elif fault == "foreign":
            update.delta["not.a.tensor"] = torch.zeros(2)
        elif fault == "slow":  # a straggler: its answer comes after federation.client_timeout
            time.sleep(config.federation.client_timeout + 0.5)
        elif fault == "huge":
            update.delta = {n: d * 1e6 for n, d in update.delta.items()}
        return update
    return client_fn


def test_failing_clients_are_left_out_and_recorded(tiny_bert, tiny_task):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **THREE, **{"federation.rounds": 2}))
    faults = {(1, 0): "raise", (1, 2): "nan", (2, 1): "shape", (2, 2): "foreign"}

    results = run_experiment(config, show_progress=False, client_fn=faulty_client(config, faults))

    first, second = results.history
    assert [c.id for c in first.clients] == [1] and [c.id for c in second.clients] == [0]
    assert [(f.client_id, f.reason) for f in first.failed_clients] == [
        (0, "the device fell off the network"), (2, "the update holds NaN or infinite values")]
    reasons = [f.reason for f in second.failed_clients]
    assert [f.client_id for f in second.failed_clients] == [1, 2]
    assert reasons[0].endswith("expected " + reasons[0].split("expected ")[1]) and "has shape" in reasons[0]
    assert reasons[1] == "the update holds 'not.a.tensor', which the client was not sent"
    assert all(v == v for v in results.final.tier_loss.values())  # no NaN reached the model


def test_a_client_slower_than_the_timeout_is_left_out_of_its_round(tiny_bert, tiny_task):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **THREE, **{"federation.rounds": 2,
                                                                                   "federation.client_timeout": 3}))

    results = run_experiment(config, show_progress=False, client_fn=faulty_client(config, {(2, 1): "slow"}))

    first, second = results.history
    assert [c.id for c in first.clients] == [0, 1, 2] and first.failed_clients is None
    assert [c.id for c in second.clients] == [0, 2]
    [late] = second.failed_clients
    assert late.client_id == 1 and late.reason.startswith("no answer within federation.client_timeout=3 s (it took 3.")


def test_too_few_updates_stop_the_run_naming_every_failure(tiny_bert, tiny_task):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **THREE, **{"federation.min_clients": 2}))
    with pytest.raises(RuntimeError, match=r"round 1: 1 of the sampled clients .*min_clients=2 .*client 0: "
                                           r"the device fell off.*client 2: the update holds NaN"):
        run_experiment(config, show_progress=False, client_fn=faulty_client(config, {(1, 0): "raise", (1, 2): "nan"}))


def test_a_run_stopped_by_its_clients_says_how_to_resume_and_resumes_to_the_same_numbers(tiny_bert, tiny_task,
                                                                                       tmp_path, monkeypatch, capsys):
    import ubsmoe.engine.rounds as simulation

    overrides = tiny_overrides(tiny_bert, tiny_task, **THREE, **{"federation.rounds": 3})
    real = simulation.run_client

    def down_in_round_2(runtime, instruction, progress=None):
        if instruction.round == 2:
            raise ClientFault("the network is down")
        return real(runtime, instruction, progress)

    monkeypatch.setattr(simulation, "run_client", down_in_round_2)
    assert main(["run", "--quiet", "--out", str(tmp_path / "run")] + overrides) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ubsmoe: the run stopped: round 2: 0 of the sampled clients returned an update")
    assert "client 0: the network is down" in err and "Traceback" not in err
    assert err.endswith(f"`ubsmoe run --resume {tmp_path / 'run'}` continues from its last checkpoint")

    monkeypatch.setattr(simulation, "run_client", real)  # the clients are back
    assert main(["run", "--quiet", "--resume", str(tmp_path / "run")]) == 0
    assert main(["run", "--quiet", "--out", str(tmp_path / "straight")] + overrides) == 0
    resumed, straight = (read_results(tmp_path / f) for f in ("run", "straight"))
    for key in ("tier_accuracy", "tier_loss", "test_loss"):
        assert getattr(resumed.final, key) == getattr(straight.final, key)


@pytest.mark.parametrize("policy", ["clip", "reject"])
def test_updates_beyond_the_norm_bound_are_clipped_or_rejected(tiny_bert, tiny_task, policy):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **THREE, **{
        "federation.max_update_norm": 0.5, "federation.update_norm_policy": policy}))
    server = Server(config)
    runtime = server.experiment.client_runtime(None)
    instruction = server.instruction(server.experiment.clients[0], 1)
    update = run_client(runtime, instruction)
    update.delta = {n: d * 1e3 for n, d in update.delta.items()}
    original = {n: d.clone() for n, d in update.delta.items()}

    admitted = server.admit(instruction, update)

    if policy == "reject":
        assert admitted.reason.startswith("the update's norm") and "max_update_norm=0.5" in admitted.reason
    else:
        norm = torch.linalg.vector_norm(torch.cat([d.double().reshape(-1) for d in admitted.delta.values()]))
        assert float(norm) == pytest.approx(0.5, rel=1e-5)
        name = next(iter(original))
        ratio = (admitted.delta[name].double().norm() / original[name].double().norm()).item()
        assert all((admitted.delta[n].double().norm() / original[n].double().norm()).item() == pytest.approx(ratio)
                   for n in original if original[n].norm() > 0)


def test_a_bad_norm_policy_is_a_user_error(tiny_bert, tiny_task, tmp_path, capsys):
    assert main(["run", "--quiet", "--out", str(tmp_path / "x")] + tiny_overrides(tiny_bert, tiny_task)
                + ["federation.update_norm_policy=drop"]) == 2
    assert "federation.update_norm_policy must be clip or reject" in capsys.readouterr().err
    assert not (tmp_path / "x" / "results.json").exists()


def test_a_bug_in_a_client_stops_the_run_unless_the_config_drops_it(tiny_bert, tiny_task, monkeypatch):
    """A client's exception is a bug, not a dropped client: it reaches the caller with its traceback, so that a
    method that crashes for one tier fails every end-to-end test; on_client_error=drop leaves it out."""
    import ubsmoe.engine.rounds as simulation

    real = simulation.run_client

    def crashes_for_the_low_tier(runtime, instruction, progress=None):
        if instruction.client.budget < 1:
            raise ZeroDivisionError("a bug in the method")
        return real(runtime, instruction, progress)

    monkeypatch.setattr(simulation, "run_client", crashes_for_the_low_tier)
    overrides = tiny_overrides(tiny_bert, tiny_task, **{"federation.rounds": 1})

    with pytest.raises(ZeroDivisionError, match="a bug in the method"):
        run_experiment(load_config(overrides=overrides), show_progress=False)
    dropped = run_experiment(load_config(overrides=overrides + ["federation.on_client_error=drop"]), show_progress=False)
    [failure] = dropped.history[0].failed_clients
    assert failure == FailedClient(0, "ZeroDivisionError: a bug in the method")


def test_a_diverged_client_is_a_fault_not_a_bug(tiny_bert, tiny_task):
    """A non-finite training loss is the client's round failing, which the engines leave out (a ClientFault)."""
    from ubsmoe.engine.server import instruction_for

    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{"train.lr": 1e30}))
    exp = build_experiment(config)
    instruction = instruction_for(exp.method, exp.method.initial_state(exp.model), exp.clients[0], 1)

    with pytest.raises(ClientFault, match=r"client 0: training loss became (nan|inf)"):
        run_client(exp.client_runtime(None), instruction)
