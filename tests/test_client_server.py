"""The client/server seam: what crosses between server and client is records of tensors and scalars, and
a client with its own model and method object, fed those records through Flower's message codec,
gives exactly the numbers of the in-process engine, for every method; the merging methods' clients
rebuild the merged base from the records even when they missed rounds or start from nothing."""

import json
from dataclasses import dataclass, field

import pytest
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from tiny_experiment import tiny_overrides
from ubsmoe.config import load_config
from ubsmoe.engine.client_round import run_client
from ubsmoe.engine.flower.messages import instruction_content, read_instruction, read_update, update_content
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.rounds import run_experiment
from ubsmoe.methods import REGISTRY
from ubsmoe.methods.records import (
    ClientInfo, ClientSettings, ClientUpdate, MethodRecord, NoRecord, TrainMetrics, flat_scalars, flat_tensors, flatten,
    unflatten,
)
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.engine.run_records import RunResults

SCALAR_TYPES = (int, float, bool, str)


def wire(tensors: dict, scalars: dict) -> tuple[dict, dict]:
    """Tensors through safetensors bytes and scalars through JSON text, as a transport would carry them."""
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert all(isinstance(v, SCALAR_TYPES) or (isinstance(v, list) and all(isinstance(x, SCALAR_TYPES) for x in v))
               for v in scalars.values()), scalars
    return (load_tensors(save_tensors({k: v.contiguous() for k, v in tensors.items()})),
            json.loads(json.dumps(scalars)))


def remote_client(config, fresh_each_message: bool = False):
    """A client_fn whose client builds its own model from the config (once, or for every message, as a
    process started per message would) and sees only the serialised records."""
    runtimes = []

    def runtime():
        if fresh_each_message or not runtimes:
            exp = build_experiment(config)
            runtimes[:] = [exp.client_runtime(FlopCounter(exp.model))]
        return runtimes[0]

    def client_fn(instruction, progress):
        wire(flat_tensors(instruction), flat_scalars(instruction))  # only tensors and plain scalars cross
        received, _ = read_instruction(instruction_content(instruction, config))  # Flower's message codec
        update = run_client(runtime(), received, progress)
        wire(flat_tensors(update), flat_scalars(update))
        return read_update(update_content(update), runtime().method.Extras)
    return client_fn


def deterministic(results: RunResults) -> list[dict]:
    """Per round: everything but times and memory."""
    rounds = []
    for h in results.history:
        entry = {k: v for k, v in h.to_json().items() if k != "cost"}
        entry["clients_cost"] = [{k: v for k, v in vars(c).items() if k != "train_seconds"} for c in h.cost.clients]
        rounds.append(entry)
    return rounds


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_a_client_with_its_own_model_gives_the_in_process_numbers(tiny_bert, tiny_task, method):
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{"model.dropout": 0.1, "threads": 1}),
                         method=method)
    shared = run_experiment(config, show_progress=False)
    apart = run_experiment(config, show_progress=False, client_fn=remote_client(config))

    assert deterministic(apart) == deterministic(shared)
    assert shared.history[-1].cost.clients[0].download_bytes > 0


@pytest.mark.parametrize("method", sorted(n for n, m in REGISTRY.items() if m.merges_into_base))
def test_merging_methods_rebuild_the_base_for_clients_that_missed_rounds(tiny_bert, tiny_task, method):
    """One of three clients per round, each message to a freshly built model: the client rebuilds the
    merged base from the original weights and every earlier round's factored update, and the numbers
    are those of the in-process engine, whose one model merged each round as it came."""
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task, **{
        "federation.num_clients": 3, "federation.budgets": "0.5,1.0,1.0", "federation.fraction_fit": 0.34,
        "federation.rounds": 3, "threads": 1}), method=method)
    shared = run_experiment(config, show_progress=False)
    apart = run_experiment(config, show_progress=False, client_fn=remote_client(config, fresh_each_message=True))

    assert deterministic(apart) == deterministic(shared)
    downloads = [h.cost.clients[0].download_bytes for h in shared.history]
    assert downloads[0] < downloads[1] < downloads[2]  # every round's merged update travels to a client


def test_bfloat16_tensors_cross_flowers_codec_bit_for_bit():
    tensors = {"w": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(3.0)}
    update = ClientUpdate(ClientInfo(0, 1.0, 4), dict(tensors))

    back = read_update(update_content(update), NoRecord)

    assert back.delta["w"].dtype == torch.bfloat16 and torch.equal(back.delta["w"], tensors["w"])
    assert torch.equal(back.delta["b"], tensors["b"])


@dataclass
class Pair(MethodRecord):
    a: torch.Tensor
    b: list[torch.Tensor]


@dataclass
class NestedState(MethodRecord):
    ranks: dict[int, int] = field(default_factory=dict)
    rounds: list[dict[str, Pair]] = field(default_factory=list)
    usage: torch.Tensor | None = None
    note: str = ""


def test_a_method_record_flattens_by_its_field_types_and_comes_back():
    record = NestedState({10: 1, 2: 3}, [{}, {"x.lora_a": Pair(torch.ones(2), [torch.zeros(1), torch.ones(3)])}, {}],
                         None, "kept")

    tensors, scalars = flatten(record)
    back = unflatten(NestedState, *wire(tensors, scalars))

    assert sorted(tensors) == ["rounds/1/x.lora_a/a", "rounds/1/x.lora_a/b/0", "rounds/1/x.lora_a/b/1"]
    assert scalars == {"ranks/10": 1, "ranks/2": 3, "note": "kept"}
    assert back.ranks == {2: 3, 10: 1} and back.usage is None and back.note == "kept"
    assert [torch.equal(t, u) for t, u in zip(back.rounds[1]["x.lora_a"].b, record.rounds[1]["x.lora_a"].b)] == [True] * 2
    assert back.rounds[0] == {} and len(back.rounds) == 2  # a trailing empty item carries nothing: it is not kept
    with pytest.raises(ValueError, match="no '/'"):
        flatten(NestedState(rounds=[{"a/b": Pair(torch.ones(1), [])}]))


def test_record_round_trips():
    settings = ClientSettings(top_k=2, rank=0, training=False, options={"note": "x", "weights": [0.5, 1.5]})
    assert ClientSettings.from_scalars(json.loads(json.dumps(settings.to_scalars()))) == settings
    metrics = TrainMetrics(train_loss=0.25, steps=3, train_tokens=40, train_seconds=1.5, step_seconds=[0.5, 0.5, 0.5],
                           train_flops={"total": 10.0, "experts": 4.0}, download_bytes=8, upload_bytes=16)
    assert TrainMetrics.from_scalars(json.loads(json.dumps(metrics.to_scalars()))) == metrics


def test_hetlora_ranks_are_decided_on_the_server_and_sent(tiny_bert, tiny_task):
    """A self-pruned rank reaches the client through its settings (the client keeps no rank table), and
    the adapters travel at that rank."""
    config = load_config(overrides=tiny_overrides(tiny_bert, tiny_task) + ["method.prune_lambda=0.5",
                                                                          "method.prune_gamma=0.5"], method="hetlora")
    exp = build_experiment(config)
    method = exp.method
    state = method.initial_state(exp.model)
    client = exp.clients[1]  # beta = 1: rank 4
    state.method.ranks[client.client_id] = 2  # as if it had pruned itself last round
    from ubsmoe.engine.server import instruction_for

    instruction = instruction_for(method, state, client, 2)
    assert instruction.settings.rank == 2
    adapter = method.adapters[0]
    assert instruction.params[adapter.a].shape[-1] == 2 and instruction.params[adapter.b].shape[-2] == 2
    update = run_client(exp.client_runtime(None), instruction)
    assert update.delta[adapter.a].shape == instruction.params[adapter.a].shape
    assert update.extras.next_rank in (1, 2)
