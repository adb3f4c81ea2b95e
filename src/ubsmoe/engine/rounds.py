"""The round loop (``run_rounds``: the server opens a round, a transport exchanges, the server closes it)
and the in-process engine, whose transport runs every sampled client in turn on one shared model.
Flower's strategy (``engine.flower.strategy``) drives the same ``Server`` steps from Flower's own loop.

The server side (``engine.server``) and the client side (``engine.client_round.run_client``) exchange only the
records of ``methods.records``, as they do across processes on Flower. The global trainable tensors, the
round's instructions and each sampled client's update are held between clients, never a model per
client. Same config and seed give the same numbers on the CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from ubsmoe.config import ExperimentConfig
from ubsmoe.engine.checkpoint import Checkpoint, fault_point
from ubsmoe.engine.client_round import run_client
from ubsmoe.engine.errors import ClientFault, RunInterrupted
from ubsmoe.engine.local_training import local_steps
from ubsmoe.engine.run_records import FailedClient, RunResults
from ubsmoe.engine.server import Answer, Server
from ubsmoe.methods.records import ClientUpdate, TrainInstruction

log = logging.getLogger(__name__)


ClientFn = Callable[[TrainInstruction, Any], ClientUpdate]


class Transport(Protocol):
    """Carries a round's instructions to the sampled clients and brings back each one's answer: its
    update, or a ``FailedClient`` for a client that did not deliver (timeout, node gone, a fault its
    code reported). A bug in a client's code is not an answer: it raises (or is a ``FailedClient`` under
    ``federation.on_client_error = "drop"``)."""

    def exchange(self, instructions: list[TrainInstruction], progress: tqdm) -> dict[int, Answer]:
        """{client id: answer} for the clients of ``instructions``; ``progress`` counts local steps."""


class InProcessTransport:
    """Every sampled client in turn on this process's one model (``run_client``), or through
    ``client_fn(instruction, progress)``.

    One whose round takes longer than ``federation.client_timeout`` is left out of it like a straggler a
    synchronous server stops waiting for (its answer is discarded when it comes: a client that never
    answers cannot be interrupted here, Flower's engines can). Dropping by time makes a run depend on the
    machine's speed: leave it at 0 where runs must repeat exactly."""

    def __init__(self, config: ExperimentConfig, client_fn: ClientFn):
        self.federation = config.federation
        self.client_fn = client_fn

    def exchange(self, instructions: list[TrainInstruction], progress: tqdm) -> dict[int, Answer]:
        answers: dict[int, Answer] = {}
        timeout = self.federation.client_timeout
        for instruction in instructions:
            client, round_index = instruction.client, instruction.round
            progress.set_description(f"round {round_index} client {client.client_id} (beta={client.budget:g})")
            started = time.monotonic()
            try:
                answer = self.client_fn(instruction, progress)
            except ClientFault as fault:  # the client did not deliver: left out, as on Flower
                answer = FailedClient(client.client_id, str(fault))
            except Exception as error:  # a bug: it stops the run, unless the config asks to drop
                if self.federation.on_client_error != "drop":
                    raise
                log.warning("round %d: client %d raised", round_index, client.client_id, exc_info=True)
                answer = FailedClient(client.client_id, f"{type(error).__name__}: {error}")
            took = time.monotonic() - started
            if timeout and took > timeout and not isinstance(answer, FailedClient):  # a straggler's late answer
                answer = FailedClient(client.client_id, f"no answer within federation.client_timeout={timeout:g} s "
                                                        f"(it took {took:.1f} s)")
            answers[client.client_id] = answer
            fault_point("train", round_index)
        return answers


def run_rounds(server: Server, transport: Transport, first: int, show_progress: bool = True) -> None:
    """Rounds ``first`` to ``federation.rounds``: the server opens each (sampling, instructions), the
    transport exchanges, the server closes it (admission, aggregation, evaluation, checkpoint). Ctrl-C
    is a ``RunInterrupted`` naming the round and the last checkpoint."""
    config = server.config
    total = config.federation.rounds
    rounds = tqdm(range(first, total + 1), desc=f"{server.method.name} rounds", unit="round",
                  disable=not show_progress, initial=first - 1, total=total)
    round_index = first
    try:
        for round_index in rounds:
            instructions = server.open_round(round_index)
            steps = sum(local_steps(config.train, i.client.num_examples) for i in instructions)
            with tqdm(total=steps, desc=f"round {round_index} clients", unit="step", leave=False,
                      disable=not show_progress) as progress:
                answers = transport.exchange(instructions, progress)
            record = server.close_round(round_index, answers)
            rounds.set_postfix(avg_acc=f"{record.average_accuracy:.3f}")
    except KeyboardInterrupt:
        raise RunInterrupted(round_index, server.checkpoint_round) from None


def run_experiment(config: ExperimentConfig, show_progress: bool = True, client_fn: ClientFn | None = None,
                   out: Path | None = None, resume: Checkpoint | None = None, variant: str | None = None
                   ) -> RunResults:
    """Run every round in this process and return the results.

    ``client_fn(instruction, progress)`` runs a client's round; by default ``run_client`` on this
    process's model. With ``out``, a checkpoint and the history so far are written there after every
    ``federation.checkpoint_every`` rounds and after the last, and at the end the final model
    (``out/model``, see ``engine.saved_model``), results.json and summary.md; ``resume`` continues from a
    checkpoint; ``variant`` is the comparison's label of the run.
    """
    server = Server(config, out=out)
    first = server.start(resume)
    if client_fn is None:
        runtime = server.experiment.client_runtime(server.flop_counter)

        def client_fn(instruction: TrainInstruction, progress) -> ClientUpdate:
            return run_client(runtime, instruction, progress)
    run_rounds(server, InProcessTransport(config, client_fn), first, show_progress)
    return server.finish("inprocess", variant)
