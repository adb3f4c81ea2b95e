"""The server side of a run, whatever carries the messages: the method's state, sampling, each client's
instruction, admission of its update, aggregation, per-tier evaluation, the history and its cost and
balance records, checkpoints. The in-process engine (``engine.rounds``) and the Flower strategy drive
the same ``Server``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ubsmoe.config import ExperimentConfig
from ubsmoe.engine.checkpoint import Checkpoint, check_resumable, fault_point, write_checkpoint
from ubsmoe.engine.clients import sample_clients
from ubsmoe.engine.errors import FederationStopped
from ubsmoe.engine.evaluation import evaluate_tiers
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.methods.base import ClientInfo, FederatedMethod, ServerState
from ubsmoe.methods.records import ClientUpdate, TrainInstruction, flat_tensors
from ubsmoe.metrics.balance import experts_without_update, load_balance
from ubsmoe.metrics.flops import FlopCounter
from ubsmoe.model import MoEModel
from ubsmoe.storage import write_atomically


class ClientFailure(NamedTuple):
    """A sampled client whose round produced no update, and why."""

    client_id: int
    reason: str


class Server:
    """The server side of a run, whatever carries the messages: the method's state, sampling, the
    instructions, aggregation, per-tier evaluation and the history. The in-process engine
    (``run_experiment``) and the Flower strategy drive the same object."""

    def __init__(self, config: ExperimentConfig, upcycle_cache: Path | None = None):
        self.started = time.perf_counter()
        self.config = config
        self.exp = build_experiment(config, upcycle_cache=upcycle_cache)
        self.method, self.model = self.exp.method, self.exp.model
        self.state = self.method.initial_state(self.model)
        self.flop_counter = FlopCounter(self.model)
        self.history: list[dict] = []
        self.round0: dict = {}
        self.updates: list[ClientUpdate] = []
        self.failures: list[ClientFailure] = []
        self.earlier_runtime_s = 0.0  # seconds run before a resume
        self.checkpoint_round = 0  # the round of the last checkpoint written or resumed from (0: none)

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
        before = evaluate_tiers(self.model, self.exp.task, self.method, self.state, self.exp.test, self.exp.tiers,
                                self.config.train.eval_batch_size)
        self.round0 = {str(b): {k: v for k, v in r.items() if k in ("accuracy", "loss", "details")}
                       for b, r in before.items()}

    def sample(self, round_index: int) -> list[ClientInfo]:
        return sample_clients(self.exp.clients, self.config.federation.fraction_fit, round_index, self.config.seed)

    def instruction(self, client: ClientInfo, round_index: int) -> TrainInstruction:
        return instruction_for(self.method, self.state, client, round_index)

    def admit(self, instruction: TrainInstruction, update: ClientUpdate) -> ClientUpdate | ClientFailure:
        """The update as it may enter aggregation, or why it may not: every delta must be one of the tensors
        the client was sent, with its shape, and finite (as every other float tensor it returns); deltas
        beyond ``federation.max_update_norm`` are clipped or rejected (``update_norm_policy``)."""
        client = instruction.client.client_id
        if update.client != instruction.client:
            return ClientFailure(client, f"the update is for client {update.client.client_id}, not {client}")
        for name, delta in update.delta.items():
            sent = instruction.params.get(name)
            if sent is None:
                return ClientFailure(client, f"the update holds {name!r}, which the client was not sent")
            if delta.shape != sent.shape:
                return ClientFailure(client, f"{name!r} has shape {tuple(delta.shape)}, expected {tuple(sent.shape)}")
        for name, value in update.tensors.items():  # extras named after a sent tensor (trained factors) keep its shape
            if name in instruction.params and value.shape != instruction.params[name].shape:
                return ClientFailure(client, f"{name!r} has shape {tuple(value.shape)}, "
                                             f"expected {tuple(instruction.params[name].shape)}")
        missing = sorted(set(instruction.params) - set(update.delta) - set(update.tensors))
        if missing:
            return ClientFailure(client, f"the update lacks {', '.join(map(repr, missing[:3]))}"
                                         + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
        if self.model.num_experts > 1:
            layers, experts = len(self.model.moe_layers), self.model.num_experts
            if (update.routing is None or update.routing.routed.shape != (layers, experts)
                    or update.routing.tokens.shape != (layers,)):
                return ClientFailure(client, f"the update lacks routing counts of shape ({layers}, {experts}) and ({layers},)")
        if not all(bool(torch.isfinite(t).all()) for t in flat_tensors(update).values() if t.is_floating_point()):
            return ClientFailure(client, "the update holds NaN or infinite values")
        bound = self.config.federation.max_update_norm
        if bound > 0 and update.delta:
            norm = float(torch.linalg.vector_norm(torch.cat([d.double().reshape(-1) for d in update.delta.values()])))
            if norm > bound:
                if self.config.federation.update_norm_policy == "reject":
                    return ClientFailure(client, f"the update's norm {norm:.4g} exceeds federation.max_update_norm={bound:g}")
                update.delta = {n: d * (bound / norm) for n, d in update.delta.items()}
        return update

    def aggregate(self, round_index: int, updates: list[ClientUpdate], failures: list[ClientFailure] = ()) -> None:
        """Fold the round's updates into the state; fewer than ``federation.min_clients`` updates stop the run."""
        needed = self.config.federation.min_clients
        if len(updates) < needed:
            reasons = "; ".join(f"client {f.client_id}: {f.reason}" for f in failures) or "no client answered"
            raise FederationStopped(f"round {round_index}: {len(updates)} of the sampled clients returned an update, "
                               f"fewer than federation.min_clients={needed} ({reasons})")
        self.updates, self.failures = sorted(updates, key=lambda u: u.client.client_id), list(failures)
        self.state = self.method.aggregate(self.state, self.updates)

    def evaluate(self, round_index: int) -> dict:
        """Every tier after the round's aggregation; the round's history entry."""
        model, updates = self.model, self.updates
        tier_results = evaluate_tiers(model, self.exp.task, self.method, self.state, self.exp.test, self.exp.tiers,
                                      self.config.train.eval_batch_size, self.flop_counter)
        entry = round_entry(round_index, tier_results, updates)
        entry["cost"] = round_cost(tier_results, updates)
        if model.num_experts > 1:
            entry["balance"] = round_balance(model, tier_results, updates)
        fault_point("evaluate", round_index)
        report = self.method.round_report(self.state)
        if report:
            entry["server"] = report
        if self.failures:
            entry["failed_clients"] = [f._asdict() for f in self.failures]
        self.history.append(entry)
        return entry

    def save_progress(self, out: Path, round_index: int) -> None:
        """After a round's evaluation: the checkpoint and the history so far in ``out``, every
        ``federation.checkpoint_every`` rounds and after the last."""
        every, total = self.config.federation.checkpoint_every, self.config.federation.rounds
        if every > 0 and (round_index % every == 0 or round_index == total):
            write_checkpoint(out, self.checkpoint(round_index))
            self.checkpoint_round = round_index
            write_atomically(out / "history.json", json.dumps(self.history, indent=1))

    def results(self) -> dict:
        """The results dictionary (see ``ubsmoe.report.results``)."""
        exp, model, method, history = self.exp, self.model, self.method, self.history
        return {
            "method": method.name,
            "config": self.config.to_dict(),
            "task": exp.task.name,
            "label_names": exp.data.key_names,
            "num_train": len(exp.train),
            "num_test": len(exp.test),
            "duplicates_removed": exp.data.duplicates_removed,
            "tiers": exp.tiers,
            "clients": [{"id": c.client_id, "budget": c.budget, "num_examples": c.num_examples,
                         "label_counts": np.bincount(np.asarray(exp.data.partition_keys)[exp.client_indices[c.client_id].numpy()],
                                                     minlength=len(exp.data.key_names)).tolist()} for c in exp.clients],
            "parameters": model.parameter_report(),
            "k_max": method.k_max + method.shared_experts,  # K_max, counting the shared experts
            "shared_experts": method.shared_experts,
            "round0": self.round0,
            "history": history,
            "final": {k: v for k, v in history[-1].items() if k != "clients"},
            "cost": run_cost(history, exp.tiers),
            "runtime_s": self.earlier_runtime_s + time.perf_counter() - self.started,
        }


def instruction_for(method: FederatedMethod, state: ServerState, client: ClientInfo, round_index: int
                    ) -> TrainInstruction:
    """The message that starts ``client``'s round: what the method decides for it and sends it."""
    return TrainInstruction(round_index, client, method.client_settings(state, client),
                            method.client_params(state, client), method.frozen_state(state))


def round_balance(model: MoEModel, tier_results: dict[float, dict], updates: list[ClientUpdate]) -> dict:
    """Expert balance of the round: global training load (from the uploaded counts), each tier's load
    on the test set, and the share of experts no client updated."""
    routed = sum(u.routing.routed for u in updates)
    return {
        "train": load_balance(routed),
        "tiers": {str(b): load_balance(torch.tensor(r["expert_load"])) for b, r in tier_results.items()},
        "experts_without_update": experts_without_update([u.delta for u in updates], model.expert_tensors(),
                                                         len(model.moe_layers), model.num_experts),
    }


def round_cost(tier_results: dict[float, dict], updates: list[ClientUpdate]) -> dict:
    """Compute and communication of the round: per client, and per tier (means over the tier's
    sampled clients, the median local step time over all their steps)."""
    clients = [{"id": u.client.client_id, "budget": u.client.budget, "train_flops": u.metrics.train_flops["total"],
                "train_seconds": u.metrics.train_seconds, "download_bytes": u.metrics.download_bytes,
                "upload_bytes": u.metrics.upload_bytes} for u in updates]
    tiers = {}
    for budget, result in tier_results.items():
        mine = [u for u in updates if u.client.budget == budget]
        tier = {"inference_flops_per_token": result["inference_flops_per_token"]}
        if mine:
            parts = mine[0].metrics.train_flops
            tier |= {
                "clients": len(mine),
                "train_flops": float(np.mean([u.metrics.train_flops["total"] for u in mine])),
                "train_flops_parts": {k: float(np.mean([u.metrics.train_flops[k] for u in mine])) for k in parts},
                "train_flops_per_token": (sum(u.metrics.train_flops["total"] for u in mine)
                                          / max(1, sum(u.metrics.train_tokens for u in mine))),
                "step_seconds_median": float(np.median([s for u in mine for s in u.metrics.step_seconds])),
                "train_seconds": float(np.mean([u.metrics.train_seconds for u in mine])),
                "download_bytes": float(np.mean([u.metrics.download_bytes for u in mine])),
                "upload_bytes": float(np.mean([u.metrics.upload_bytes for u in mine])),
            }
        tiers[str(budget)] = tier
    return {"clients": clients, "tiers": tiers}


def run_cost(history: list[dict], budgets: list[float]) -> dict:
    """The run's cost per tier over all rounds (means per client per round; the median step time over
    rounds' medians), the low tier's reductions against the top tier, and the peak resident memory."""
    tiers = {}
    for budget in map(str, budgets):
        rounds = [h["cost"]["tiers"][budget] for h in history if "train_flops" in h["cost"]["tiers"][budget]]
        tier = {"inference_flops_per_token": history[-1]["cost"]["tiers"][budget]["inference_flops_per_token"]}
        if rounds:
            for key in ("train_flops", "train_flops_per_token", "train_seconds", "download_bytes", "upload_bytes"):
                tier[key] = float(np.mean([r[key] for r in rounds]))
            tier["step_seconds_median"] = float(np.median([r["step_seconds_median"] for r in rounds]))
        tiers[budget] = tier
    low, high = tiers[str(min(budgets))], tiers[str(max(budgets))]
    reduction = {key: 1 - low[key] / high[key] for key in ("train_flops", "train_flops_per_token",
                                                           "step_seconds_median", "inference_flops_per_token")
                 if key in low and key in high and high[key] > 0}
    return {"tiers": tiers, "low_tier_reduction": reduction, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def round_entry(round_index: int, tier_results: dict[float, dict], updates) -> dict:
    tier_accuracy = {str(b): r["accuracy"] for b, r in tier_results.items()}
    tier_loss = {str(b): r["loss"] for b, r in tier_results.items()}
    entry = {
        "round": round_index,
        "tier_accuracy": tier_accuracy,
        "average_accuracy": sum(tier_accuracy.values()) / len(tier_accuracy),
        "tier_loss": tier_loss,
        "test_loss": sum(tier_loss.values()) / len(tier_loss),
        "clients": [{"id": u.client.client_id, "budget": u.client.budget, "train_loss": u.metrics.train_loss,
                     "steps": u.metrics.steps} for u in updates],
    }
    loads = {str(b): r["expert_load"] for b, r in tier_results.items() if "expert_load" in r}
    if loads:
        entry["tier_expert_load"] = loads
    details = {str(b): r["details"] for b, r in tier_results.items() if "details" in r}
    if details:  # the task's further figures per tier (causal-lm: accuracy per task and protocol)
        entry["tier_details"] = details
    return entry
