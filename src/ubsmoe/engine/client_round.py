"""One client's round, from the server's instruction to the client's update.

``run_client`` is the whole client side of the protocol: the in-process engine calls it for each
sampled client on its one shared model, and a Flower ClientApp calls it in its own process. It sees
only the ``ClientRuntime`` built from the config (the task, the training data, the model, the method's
client hooks) and the ``TrainInstruction``; it returns a ``ClientUpdate``. Nothing else crosses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ubsmoe.config import ExperimentConfig
from ubsmoe.data.dataset import TokenizedDataset
from ubsmoe.engine.errors import ClientFault
from ubsmoe.engine.local_training import train_local
from ubsmoe.methods.base import FederatedMethod
from ubsmoe.methods.records import ClientUpdate, RoutingStats, TrainInstruction
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.model import MoEModel
from ubsmoe.tasks import Task


@dataclass
class ClientRuntime:
    """What a client process holds between rounds, built once from the config: the task, the training
    data with every client's partition (rebuilt from the seed and the partition id, so any process gets
    the same), one model and the method (its ``prepare_model`` applied)."""

    config: ExperimentConfig
    task: Task
    train: TokenizedDataset
    partitions: list[torch.Tensor]  # client id -> indices of its training examples
    model: MoEModel
    method: FederatedMethod
    flop_counter: FlopCounter


def seed_for(seed: int, round_index: int, client_id: int) -> int:
    """A distinct, reproducible seed per (experiment seed, round, client)."""
    return int(np.random.SeedSequence([seed, round_index, client_id]).generate_state(1)[0])


def run_client(runtime: ClientRuntime, instruction: TrainInstruction, progress=None) -> ClientUpdate:
    """Train on the instruction's client partition from the tensors it carries and return the update
    (deltas, routing counts, method extras, metrics with the bytes of both records)."""
    model, method, client = runtime.model, runtime.method, instruction.client
    settings, config = instruction.settings, runtime.config
    method.sync_frozen(model, instruction.frozen)
    start = method.start_params(model, instruction.params, settings)
    model.load_trainable_state(start)
    method.setup_client(model, settings)
    try:
        torch.manual_seed(seed_for(config.seed, instruction.round, client.client_id))
        generator = torch.Generator().manual_seed(seed_for(config.seed + 1, instruction.round, client.client_id))
        try:
            metrics = train_local(model, runtime.task, method, runtime.train, runtime.partitions[client.client_id],
                                  config.train, generator, progress=progress, flop_counter=runtime.flop_counter)
        except FloatingPointError as error:  # diverged: a fault of this client's round, not a bug
            raise ClientFault(f"client {client.client_id}: {error}") from None
        routing = None
        if model.num_experts > 1:
            routed, tokens, _ = model.routing_counts()
            routing = RoutingStats(routed, tokens)
        update = method.client_update(model, start, client, settings, routing)
    finally:
        method.teardown_client(model)
    metrics.download_bytes, metrics.upload_bytes = instruction.nbytes, update.nbytes
    update.metrics = metrics
    return update
