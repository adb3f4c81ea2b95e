"""The server side of a run, whatever carries the messages: the method's state, sampling, each client's
instruction, admission of its update, aggregation, per-tier evaluation, the history and its cost and
balance records, checkpoints. The in-process engine (``engine.rounds``) and the Flower strategy drive
the same ``Server``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from ubsmoe.config import ExperimentConfig
from ubsmoe.engine.checkpoint import Checkpoint, check_resumable, fault_point, write_checkpoint
from ubsmoe.engine.population import sample_clients
from ubsmoe.engine.errors import FederationStopped
from ubsmoe.engine.evaluation import evaluate_tiers
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.engine.run_folder import write_results
from ubsmoe.engine.run_records import (ClientCost, ClientRecord, ClientRound, FailedClient, RoundBalance, RoundCost,
                                       RoundRecord, RunCost, RunResults, TierCost, TierScore)
from ubsmoe.engine.saved_model import save_model
from ubsmoe.methods.base import ClientInfo, FederatedMethod, ServerState
from ubsmoe.methods.records import ClientUpdate, TrainInstruction, flat_tensors
from ubsmoe.metrics.balance import experts_without_update, load_balance
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.model import MoEModel
from ubsmoe.storage import write_atomically


Answer = ClientUpdate | FailedClient  # what a transport brings back for one sampled client


class Server:
    """The server side of a run, whatever carries the messages. A round is ``open_round`` (sample, one
    instruction per client), the transport's exchange, then ``close_round`` (admit, aggregate, evaluate,
    checkpoint); ``finish`` ends the run. The in-process engine (``engine.rounds``) and the Flower strategy
    drive the same object through the same steps (Flower's template loop calls ``aggregate`` and
    ``evaluate`` separately)."""

    def __init__(self, config: ExperimentConfig, out: Path | None = None):
        self.started = time.perf_counter()
        self.config = config
        self.out = out  # the run folder: checkpoints, history, the saved model and results (None: nothing written)
        self.experiment = build_experiment(config, upcycle_cache=None if out is None else out / "model")
        self.method, self.model = self.experiment.method, self.experiment.model
        self.state = self.method.initial_state(self.model)
        self.flop_counter = FlopCounter(self.model)
        self.history: list[RoundRecord] = []
        self.round0: dict[str, TierScore] = {}
        self.outgoing: dict[int, TrainInstruction] = {}  # this round's instructions by client id
        self.updates: list[ClientUpdate] = []
        self.failures: list[FailedClient] = []
        self.earlier_runtime_s = 0.0  # seconds run before a resume
        self.checkpoint_round = 0  # the round of the last checkpoint written or resumed from (0: none)

    def start(self, resume: Checkpoint | None = None) -> int:
        """Continue from ``resume``, or evaluate round 0 if configured; returns the first round to run."""
        if resume is not None:
            return self.restore(resume)
        if self.config.evaluation.round0:
            self.evaluate_round0()
        return 1

    def restore(self, checkpoint: Checkpoint) -> int:
        """Continue from a checkpoint of this config; returns the next round."""
        check_resumable(checkpoint, self.config)
        self.state, self.history, self.round0 = checkpoint.state, checkpoint.history, checkpoint.round0
        self.earlier_runtime_s = checkpoint.runtime_s
        self.checkpoint_round = checkpoint.round
        return checkpoint.round + 1

    def checkpoint(self, round_index: int) -> Checkpoint:
        return Checkpoint(round_index, self.state, self.history, self.round0, self.config.to_dict(),
                          self.earlier_runtime_s + time.perf_counter() - self.started)

    def evaluate_round0(self) -> None:
        """What every tier scores before any training: what fine-tuning adds is read against it."""
        before = self._evaluate_tiers(None)
        self.round0 = {str(b): score.scores_only() for b, score in before.items()}

    def open_round(self, round_index: int) -> list[TrainInstruction]:
        """The round's sampled clients, each with its instruction (kept to admit the answers against)."""
        instructions = [self.instruction(c, round_index) for c in sample_clients(
            self.experiment.clients, self.config.federation.fraction_fit, round_index, self.config.seed)]
        self.outgoing = {i.client.client_id: i for i in instructions}
        return instructions

    def close_round(self, round_index: int, answers: dict[int, Answer]) -> RoundRecord:
        """Admit and aggregate the answers (by the id of the client each was sent to), evaluate every tier,
        write the checkpoint; the round's record."""
        self.aggregate(round_index, answers)
        return self.evaluate(round_index)

    def instruction(self, client: ClientInfo, round_index: int) -> TrainInstruction:
        return instruction_for(self.method, self.state, client, round_index)

    def admit(self, instruction: TrainInstruction, update: ClientUpdate) -> Answer:
        """The update as it may enter aggregation, or why it may not: every delta must be one of the tensors
        the client was sent, with its shape, and finite (as every other float tensor it returns); deltas
        beyond ``federation.max_update_norm`` are clipped or rejected (``update_norm_policy``)."""
        client = instruction.client.client_id
        if update.client != instruction.client:
            return FailedClient(client, f"the update is for client {update.client.client_id}, not {client}")
        for name, delta in update.delta.items():
            sent = instruction.params.get(name)
            if sent is None:
                return FailedClient(client, f"the update holds {name!r}, which the client was not sent")
            if delta.shape != sent.shape:
                return FailedClient(client, f"{name!r} has shape {tuple(delta.shape)}, expected {tuple(sent.shape)}")
        trained = update.extras.trained()
        for name, value in trained.items():  # extras that stand for a sent tensor (trained factors) keep its shape
            if name in instruction.params and value.shape != instruction.params[name].shape:
                return FailedClient(client, f"{name!r} has shape {tuple(value.shape)}, "
                                            f"expected {tuple(instruction.params[name].shape)}")
        missing = sorted(set(instruction.params) - set(update.delta) - set(trained))
        if missing:
            return FailedClient(client, f"the update lacks {', '.join(map(repr, missing[:3]))}"
                                        + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        if self.model.num_experts > 1:
            layers, experts = len(self.model.moe_layers), self.model.num_experts
            if (update.routing is None or update.routing.routed.shape != (layers, experts)
                    or update.routing.tokens.shape != (layers,)):
                return FailedClient(client, f"the update lacks routing counts of shape ({layers}, {experts}) and ({layers},)")
        if not all(bool(torch.isfinite(t).all()) for t in flat_tensors(update).values() if t.is_floating_point()):
            return FailedClient(client, "the update holds NaN or infinite values")
        bound = self.config.federation.max_update_norm
        if bound > 0 and update.delta:
            norm = float(torch.linalg.vector_norm(torch.cat([d.double().reshape(-1) for d in update.delta.values()])))
            if norm > bound:
                if self.config.federation.update_norm_policy == "reject":
                    return FailedClient(client, f"the update's norm {norm:.4g} exceeds federation.max_update_norm={bound:g}")
                update.delta = {n: d * (bound / norm) for n, d in update.delta.items()}
        return update

    def aggregate(self, round_index: int, answers: dict[int, Answer]) -> None:
        """Admit each answer against the instruction its client was sent (a client sent nothing is a
        failure: it did not reply), and fold the admitted updates into the state; fewer than
        ``federation.min_clients`` stop the run."""
        updates, failures = [], []
        for client_id, instruction in sorted(self.outgoing.items()):
            answer = answers.get(client_id, FailedClient(client_id, "no reply before the timeout"))
            if isinstance(answer, ClientUpdate):
                answer = self.admit(instruction, answer)
            (failures if isinstance(answer, FailedClient) else updates).append(answer)
        needed = self.config.federation.min_clients
        if len(updates) < needed:
            reasons = "; ".join(f"client {f.client_id}: {f.reason}" for f in failures) or "no client answered"
            raise FederationStopped(f"round {round_index}: {len(updates)} of the sampled clients returned an update, "
                                    f"fewer than federation.min_clients={needed} ({reasons})")
        self.updates, self.failures = updates, failures
        self.state = self.method.aggregate(self.state, self.updates)
        fault_point("aggregate", round_index)

    def evaluate(self, round_index: int) -> RoundRecord:
        """Every tier after the round's aggregation: the round's record, added to the history; the
        checkpoint and the history so far go to the run folder (every ``federation.checkpoint_every``
        rounds and after the last)."""
        model, updates = self.model, self.updates
        scores = self._evaluate_tiers(self.flop_counter)
        clients = [ClientRound(u.client.client_id, u.client.budget, u.metrics.train_loss, u.metrics.steps,
                               None if u.routing is None else float((u.routing.routed > 0).double().mean()))
                   for u in updates]
        record = RoundRecord.from_scores(round_index, scores, clients, round_cost(scores, updates))
        if model.num_experts > 1:
            record.balance = round_balance(model, scores, updates)
        fault_point("evaluate", round_index)
        record.server = self.method.round_report(self.state) or None
        record.failed_clients = list(self.failures) or None
        self.history.append(record)
        if self.out is not None:
            self._save_progress(round_index)
        return record

    def _evaluate_tiers(self, flop_counter: FlopCounter | None) -> dict[str, TierScore]:
        exp = self.experiment
        scores = evaluate_tiers(self.model, exp.task, self.method, self.state, exp.test, exp.tiers,
                                self.config.train.eval_batch_size, flop_counter)
        return {str(b): score for b, score in scores.items()}

    def _save_progress(self, round_index: int) -> None:
        """The checkpoint and the history so far in the run folder, every ``federation.checkpoint_every`` rounds
        and after the last."""
        every, total = self.config.federation.checkpoint_every, self.config.federation.rounds
        if every > 0 and (round_index % every == 0 or round_index == total):
            write_checkpoint(self.out, self.checkpoint(round_index))
            self.checkpoint_round = round_index
            write_atomically(self.out / "history.json", json.dumps([r.to_json() for r in self.history], indent=1))

    def finish(self, engine: str, variant: str | None = None) -> RunResults:
        """The end of every run, whatever ran it: the results, and in the run folder the final model,
        results.json and summary.md."""
        results = self.results(engine, variant)
        if self.out is not None:
            save_model(self.out / "model", self.experiment, self.state)
            write_results(results, self.out)
        return results

    def results(self, engine: str, variant: str | None = None) -> RunResults:
        exp, model, method = self.experiment, self.model, self.method
        label_counts = np.asarray(exp.data.partition_keys)
        return RunResults(
            method=method.name, config=self.config.to_dict(), task=exp.task.name, label_names=exp.data.key_names,
            num_train=len(exp.train), num_test=len(exp.test), duplicates_removed=exp.data.duplicates_removed,
            tiers=exp.tiers,
            clients=[ClientRecord(c.client_id, c.budget, c.num_examples,
                                  np.bincount(label_counts[exp.client_indices[c.client_id].numpy()],
                                              minlength=len(exp.data.key_names)).tolist()) for c in exp.clients],
            parameters=model.parameter_report(),
            k_max=method.k_max + method.shared_experts,  # K_max, counting the shared experts
            shared_experts=method.shared_experts, round0=self.round0, history=self.history,
            cost=run_cost(self.history, exp.tiers),
            runtime_s=self.earlier_runtime_s + time.perf_counter() - self.started, engine=engine, variant=variant)


def instruction_for(method: FederatedMethod, state: ServerState, client: ClientInfo, round_index: int
                    ) -> TrainInstruction:
    """The message that starts ``client``'s round: what the method decides for it and sends it."""
    return TrainInstruction(round_index, client, method.client_settings(state, client),
                            method.client_params(state, client), method.frozen_state(state))


def round_balance(model: MoEModel, scores: dict[str, TierScore], updates: list[ClientUpdate]) -> RoundBalance:
    """Expert balance of the round: global training load (from the uploaded counts), each tier's load
    on the test set, and the share of experts no client updated."""
    routed = sum(u.routing.routed for u in updates)
    return RoundBalance(load_balance(routed),
                        {t: load_balance(torch.tensor(s.expert_load)) for t, s in scores.items()},
                        experts_without_update([u.delta for u in updates], model.expert_tensors(),
                                               len(model.moe_layers), model.num_experts))


def round_cost(scores: dict[str, TierScore], updates: list[ClientUpdate]) -> RoundCost:
    """Compute and communication of the round: per client, and per tier (means over the tier's
    sampled clients, the median local step time over all their steps)."""
    clients = [ClientCost(u.client.client_id, u.client.budget, u.metrics.train_flops["total"], u.metrics.train_seconds,
                          u.metrics.download_bytes, u.metrics.upload_bytes) for u in updates]
    tiers = {}
    for tier, score in scores.items():
        mine = [u for u in updates if str(u.client.budget) == tier]
        cost = TierCost(score.inference_flops_per_token)
        if mine:
            parts = mine[0].metrics.train_flops
            cost = TierCost(
                inference_flops_per_token=score.inference_flops_per_token,
                clients=len(mine),
                train_flops=float(np.mean([u.metrics.train_flops["total"] for u in mine])),
                train_flops_parts={k: float(np.mean([u.metrics.train_flops[k] for u in mine])) for k in parts},
                train_flops_per_token=(sum(u.metrics.train_flops["total"] for u in mine)
                                       / max(1, sum(u.metrics.train_tokens for u in mine))),
                step_seconds_median=float(np.median([s for u in mine for s in u.metrics.step_seconds])),
                train_seconds=float(np.mean([u.metrics.train_seconds for u in mine])),
                download_bytes=float(np.mean([u.metrics.download_bytes for u in mine])),
                upload_bytes=float(np.mean([u.metrics.upload_bytes for u in mine])))
        tiers[tier] = cost
    return RoundCost(clients, tiers)


RUN_COST_MEANS = ("train_flops", "train_flops_per_token", "train_seconds", "download_bytes", "upload_bytes")
REDUCTIONS = ("train_flops", "train_flops_per_token", "step_seconds_median", "inference_flops_per_token")


def run_cost(history: list[RoundRecord], budgets: list[float]) -> RunCost:
    """The run's cost per tier over all rounds (means per client per round; the median step time over
    rounds' medians), the low tier's reductions against the top tier, and the peak resident memory."""
    tiers = {}
    for tier in map(str, budgets):
        rounds = [r.cost.tiers[tier] for r in history if r.cost.tiers[tier].trained]
        cost = TierCost(history[-1].cost.tiers[tier].inference_flops_per_token)
        if rounds:
            for key in RUN_COST_MEANS:
                setattr(cost, key, float(np.mean([getattr(r, key) for r in rounds])))
            cost.step_seconds_median = float(np.median([r.step_seconds_median for r in rounds]))
        tiers[tier] = cost
    low, high = tiers[str(min(budgets))], tiers[str(max(budgets))]
    reduction = {key: 1 - getattr(low, key) / getattr(high, key) for key in REDUCTIONS
                 if getattr(low, key) is not None and getattr(high, key) is not None and getattr(high, key) > 0}
    return RunCost(tiers, reduction, peak_rss_mb())


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
