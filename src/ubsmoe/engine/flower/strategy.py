"""A Flower Strategy that is the ubsmoe method's server: it samples clients, sends each its
``TrainInstruction``, aggregates the ``ClientUpdate`` replies with the method and evaluates every tier
on the server, all through the engine's ``Server`` (the in-process engine drives the same object).

Flower's built-in FedAvg expects every client to return the same arrays; here clients return what
their method and tier make them send (ranks, extras), so the strategy reads them as records.
A client that did not deliver (its node gone, no reply in time, a non-finite loss, an update the
server does not admit: non-finite or wrongly shaped tensors, see ``Server.admit``) is dropped and
recorded in the round's ``failed_clients``; a round needs ``federation.min_clients`` updates or the run
stops. A client whose code raised is a bug: the run stops with its traceback (``ClientBug``), unless
``federation.on_client_error=drop``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import DEFAULT_TTL, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ubsmoe.engine.errors import ClientBug
from ubsmoe.engine.flower.client_app import BUDGET, PARTITION
from ubsmoe.engine.flower.messages import (CLIENT_FAULT, NODE_MISCONFIGURED, global_arrays, instruction_content,
                                          read_update)
from ubsmoe.engine.run_records import FailedClient
from ubsmoe.engine.server import Answer, Server
from ubsmoe.methods.records import TrainInstruction

log = logging.getLogger(__name__)

# Replies that say a client did not deliver (left out of the round); any other error reply is a bug
FAULTS = (CLIENT_FAULT, ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
          ErrorCode.CLIENT_APP_CRASHED)


class MethodStrategy(Strategy):
    """Configuration, aggregation and evaluation delegated to the registered ubsmoe method."""

    def __init__(self, server: Server, node_wait_s: float = 120.0, progress=None, round_timeout_s: float = DEFAULT_TTL,
                 rounds_done: int = 0):
        self.server = server
        # Flower numbers the rounds it runs from 1; a resumed run's round r is Flower's r - rounds_done
        self.rounds_done = rounds_done
        self.node_wait_s = node_wait_s
        self.progress = progress  # a tqdm bar over the rounds, or None
        self.ttl = max(float(DEFAULT_TTL), round_timeout_s + 60.0)  # a message outlives the round's wait
        self.node_of: dict[int, int] = {}  # client (partition) id -> node id
        self.outgoing: list[tuple[Message, TrainInstruction]] = []  # this round's messages (ids set when pushed)

    def summary(self) -> None:
        """Flower's log line about the strategy (our runs log through results.json instead)."""

    def _map_nodes(self, grid: Grid) -> None:
        """Ask every node its partition id, once; wait for one node per client."""
        wanted = self.server.config.federation.num_clients
        deadline = time.monotonic() + self.node_wait_s
        while len(nodes := sorted(grid.get_node_ids())) < wanted:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(nodes)} of federation.num_clients={wanted} nodes connected within "
                                   f"{self.node_wait_s:.0f} s: start one SuperNode per client")
            time.sleep(0.2)
        queries = [Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in nodes]
        budgets = {c.client_id: c.budget for c in self.server.experiment.clients}
        for reply in grid.send_and_receive(queries, timeout=self.node_wait_s):
            if reply.has_error():
                raise RuntimeError(f"node {reply.metadata.src_node_id}: {reply.error.reason}")
            node = reply.content["node"]
            partition = int(node[PARTITION])
            if partition not in budgets:
                raise RuntimeError(f"a node holds partition {partition}, but the run has clients 0..{wanted - 1}")
            if BUDGET in node and abs(float(node[BUDGET]) - budgets[partition]) > 1e-9:
                raise RuntimeError(f"the node of partition {partition} has budget {node[BUDGET]}, the config gives "
                                   f"client {partition} {budgets[partition]}: make federation.client_budgets match "
                                   "the SuperNodes' --node-config")
            self.node_of[partition] = reply.metadata.src_node_id
        missing = sorted(set(range(wanted)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"no node holds partitions {missing}: give each SuperNode its partition-id")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        server_round += self.rounds_done
        if not self.node_of:
            self._map_nodes(grid)
        self.outgoing = []
        for instruction in self.server.open_round(server_round):
            message = Message(instruction_content(instruction, self.server.config),
                              dst_node_id=self.node_of[instruction.client.client_id],
                              message_type=MessageType.TRAIN, group_id=str(server_round), ttl=self.ttl)
            self.outgoing.append((message, instruction))
        return [message for message, _ in self.outgoing]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.rounds_done
        answers = self.answers(server_round, replies)
        self.server.aggregate(server_round, answers)
        return global_arrays(self.server.state.params), MetricRecord({"updates": len(self.server.updates),
                                                                      "failures": len(self.server.failures)})

    def answers(self, server_round: int, replies: Iterable[Message]) -> dict[int, Answer]:
        """{client id: its update, or why it has none} from the round's replies. A reply names the message it
        answers; the SuperLink itself answers for a node gone offline. An error reply other than a fault
        (``FAULTS``) is a bug of the client's code: ``ClientBug`` with its traceback, unless
        ``federation.on_client_error = "drop"``; a node started for another partition stops the run whatever
        the policy. A client without a reply is left to the server."""
        by_id = {message.metadata.message_id: instruction for message, instruction in self.outgoing}
        answers: dict[int, Answer] = {}
        for reply in replies:
            instruction = by_id.get(reply.metadata.reply_to_message_id)
            if instruction is None or instruction.client.client_id in answers:
                log.warning("round %d: a reply to no message of this round was ignored", server_round)
                continue
            client_id = instruction.client.client_id
            if reply.has_error():
                if reply.error.code == NODE_MISCONFIGURED:  # neither a fault nor a bug: no round can use the node
                    raise RuntimeError(f"round {server_round}: the SuperNode of client {client_id} is misconfigured: "
                                       f"{reply.error.reason}")
                if reply.error.code not in FAULTS and self.server.config.federation.on_client_error != "drop":
                    raise ClientBug(f"round {server_round}: client {client_id}'s code raised "
                                    f"(federation.on_client_error=drop would leave it out):\n{reply.error.reason}")
                reason = (str(reply.error.reason).strip().splitlines() or ["(no reason given)"])[-1]
                answers[client_id] = FailedClient(client_id, reason)
                continue
            try:
                answers[client_id] = read_update(reply.content, self.server.method.Extras)
            except (KeyError, ValueError, TypeError) as error:  # a reply that is not a ClientUpdate
                answers[client_id] = FailedClient(client_id, f"an unreadable update ({type(error).__name__}: {error})")
        return answers

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        """None: tiers are evaluated on the server (``evaluate``)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Flower's ``evaluate_fn``: every tier after the round (round 0, before training, is the server's
        ``start``)."""
        if server_round == 0:
            return None
        record = self.server.evaluate(server_round + self.rounds_done)
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix(avg_acc=f"{record.average_accuracy:.3f}")
        return MetricRecord({"average_accuracy": record.average_accuracy})
