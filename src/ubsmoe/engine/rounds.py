"""The in-process engine: the server's round loop, every sampled client run in turn on one shared model.

The server side (``engine.server``) and the client side (``engine.client.run_client``) exchange only the
records of ``methods.records``, as they do across processes on Flower. Only the global trainable tensors
and each sampled client's update are held between clients, never a model per client. Same config and
seed give the same numbers on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ubsmoe.config import ExperimentConfig
from ubsmoe.engine.checkpoint import Checkpoint, fault_point
from ubsmoe.engine.client import run_client
from ubsmoe.engine.errors import ClientFault, RunInterrupted
from ubsmoe.engine.local_training import local_steps
from ubsmoe.engine.saved_model import save_model
from ubsmoe.engine.server import ClientFailure, Server
from ubsmoe.methods.records import ClientUpdate, TrainInstruction

log = logging.getLogger(__name__)


ClientFn = Callable[[TrainInstruction, Any], ClientUpdate]


def run_experiment(config: ExperimentConfig, show_progress: bool = True, client_fn: ClientFn | None = None,
                   out: Path | None = None, resume: Checkpoint | None = None) -> dict:
    """Run every round in this process and return the results dictionary (see ``ubsmoe.report.results``).

    ``client_fn(instruction, progress)`` runs a client's round; by default ``run_client`` on this
    process's model. Another transport (a client in another process, records serialised) plugs in here.
    With ``out``, a checkpoint and the history so far are written there after every
    ``federation.checkpoint_every`` rounds and after the last, and the final model into ``out/model``
    (``engine.saved_model``); ``resume`` continues from a checkpoint.

    Clients run one after the other; one whose round takes longer than ``federation.client_timeout`` is
    left out of it like a straggler a synchronous server stops waiting for (its answer is discarded when it
    comes: a client that never answers cannot be interrupted here, Flower's engines can). Dropping by time
    makes a run depend on the machine's speed: leave it at 0 where runs must repeat exactly.
    """
    server = Server(config, upcycle_cache=None if out is None else out / "model")  # the saved model's upcycled parts
    first = 1
    if resume is not None:
        first = server.restore(resume)
    elif config.evaluation.round0:
        server.evaluate_round0()
    if client_fn is None:
        runtime = server.exp.client_runtime(server.flop_counter)

        def client_fn(instruction: TrainInstruction, progress) -> ClientUpdate:
            return run_client(runtime, instruction, progress)
    total, timeout = config.federation.rounds, config.federation.client_timeout
    rounds = tqdm(range(first, total + 1), desc=f"{server.method.name} rounds", unit="round",
                  disable=not show_progress, initial=first - 1, total=total)
    round_index = first
    try:
        for round_index in rounds:
            sampled = server.sample(round_index)
            total_steps = sum(local_steps(config.train, c.num_examples) for c in sampled)
            updates = []
            with tqdm(total=total_steps, desc=f"round {round_index} clients", unit="step", leave=False,
                      disable=not show_progress) as bar:
                failures: list[ClientFailure] = []
                for client in sampled:
                    bar.set_description(f"round {round_index} client {client.client_id} (beta={client.budget:g})")
                    instruction = server.instruction(client, round_index)
                    started = time.monotonic()
                    try:
                        answer = server.admit(instruction, client_fn(instruction, bar))
                    except ClientFault as fault:  # the client did not deliver: left out, as on Flower
                        answer = ClientFailure(client.client_id, str(fault))
                    except Exception as error:  # a bug: it stops the run, unless the config asks to drop
                        if config.federation.on_client_error != "drop":
                            raise
                        log.warning("round %d: client %d raised", round_index, client.client_id, exc_info=True)
                        answer = ClientFailure(client.client_id, f"{type(error).__name__}: {error}")
                    took = time.monotonic() - started
                    if timeout and took > timeout and not isinstance(answer, ClientFailure):  # a straggler's late answer
                        answer = ClientFailure(client.client_id, f"no answer within federation.client_timeout={timeout:g} s "
                                                                 f"(it took {took:.1f} s)")
                    (failures if isinstance(answer, ClientFailure) else updates).append(answer)
                    fault_point("train", round_index)
            server.aggregate(round_index, updates, failures)
            fault_point("aggregate", round_index)
            entry = server.evaluate(round_index)
            if out is not None:
                server.save_progress(out, round_index)
            rounds.set_postfix(avg_acc=f"{entry['average_accuracy']:.3f}")
    except KeyboardInterrupt:
        raise RunInterrupted(round_index, server.checkpoint_round) from None
    if out is not None:
        save_model(out / "model", server)
    return server.results() | {"engine": "inprocess"}
