"""``ubsmoe bench tiers``: one local training step per budget tier, UB-SMoE against HetLoRA.

The default backbone (MiniLM; any other with ``backbone``; UB-SMoE upcycled to M = 8 experts, HetLoRA on
the dense model with r_max = 8), one batch of real BBC News training texts, interleaved in one process:
every tier's step runs once per round, so machine noise hits all alike. A turn is a client's first few
local steps in a row; the time is that of ``local_step`` (forward, backward, the method's gradient
adjustments, the optimiser step) averaged over the turn's steps after the first; the client set-up is
not timed.
Writes per method and tier the counted training FLOPs of the step and its median time, and the low
tier's reductions against the top tier: from the medians, and as the median over rounds of the same
round's ratio (less sensitive to slow drifts of the machine's speed). Further turns with timing hooks
(``step_parts``) split each tier's step into the FFN layers, the method's gradient work, the optimiser
and the rest, which does not depend on the tier.
"""

from __future__ import annotations

import json
import statistics
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ubsmoe.bench.step_parts import PARTS, StepParts
from ubsmoe.bench.timing import interleaved_times
from ubsmoe.config import load_config
from ubsmoe.engine.local_training import local_step
from ubsmoe.engine.experiment import build_experiment
from ubsmoe.metrics.flops import FlopCounter

BUDGETS = (0.25, 0.5, 0.75, 1.0)
# A client runs its local steps back to back; so does each turn here, and the first step of a turn,
# which pays for the switch from another tier's shapes (allocator, caches), is not counted.
STEPS_PER_TURN = 3
# The goals for the low tier against the top tier
GOAL_FLOP_SAVING, GOAL_TIME_SAVING, HETLORA_TIME_SAVING_BELOW = 0.40, 0.35, 0.10


def _turn(exp, budget: float, batch, counter: FlopCounter, flops: dict, key: str, parts: dict | None = None):
    """A turn of ``STEPS_PER_TURN`` local steps; returns the mean seconds of the steps after the first.
    With ``parts``, the turn runs with timing hooks and appends the mean split of those steps to parts[key]."""
    model, method = exp.model, exp.method
    settings = method.tier_settings(budget)  # a training client of this budget
    params = [p for p in model.parameters() if p.requires_grad]

    def fn() -> float:
        method.setup_client(model, settings)
        model.train()
        optimizer = torch.optim.AdamW(params, lr=0.0)  # lr 0: the model stays put
        seconds, splits = [], []
        with StepParts(model, method, optimizer) if parts is not None else nullcontext() as hooks:
            for _ in range(STEPS_PER_TURN):
                start = time.perf_counter()
                local_step(model, exp.task, method, batch, optimizer)
                seconds.append(time.perf_counter() - start)
                if hooks is not None:
                    splits.append(hooks.split(seconds[-1]))
        flops[key] = counter.count(batch[1], training=True).total
        method.teardown_client(model)
        if parts is not None:
            parts.setdefault(key, []).append({p: statistics.mean(s[p] for s in splits[1:]) for p in PARTS})
        return statistics.mean(seconds[1:])
    return fn


def run(out: Path, methods: tuple[str, ...] = ("ubsmoe", "hetlora"), backbone: str = "minilm", batch_size: int = 16,
        max_length: int = 128, repeats: int = 11, part_repeats: int = 5, threads: int = 2, seed: int = 0,
        dropout: float = -1.0, overrides: tuple[str, ...] = ()) -> dict:
    """dropout: the backbone's dropout probability (-1: the checkpoint's, as in the default experiment);
    part_repeats: turns per tier with timing hooks, for the split of a step into its parts; overrides:
    further ``key=value`` config settings (``task=causal-lm data.dataset=commonsense:PATH`` times the
    causal-LM step)."""
    candidates, hooked, parts, flops, setups = {}, {}, {}, {}, {}
    for name in methods:
        config = load_config(overrides=[f"threads={threads}", f"seed={seed}", f"model.backbone={backbone}",
                                        f"model.max_length={max_length}",
                                        "data.max_train_samples=256", "data.max_test_samples=16",
                                        f"model.dropout={dropout}", *overrides], method=name)
        exp = build_experiment(config)
        exp.model.load_trainable_state(exp.method.initial_state(exp.model).params)
        counter = FlopCounter(exp.model)
        batch = exp.train.batch(torch.arange(batch_size))
        setups[name] = exp
        for budget in BUDGETS:
            key = f"{name}@{budget}"
            candidates[key] = _turn(exp, budget, batch, counter, flops, key)
            hooked[key] = _turn(exp, budget, batch, counter, flops, key, parts)
    times = interleaved_times(candidates, repeats, progress="timed rounds (every tier once)")
    interleaved_times(hooked, part_repeats, warmup=0, progress="rounds with timing hooks")
    dropout_option = f" --dropout {dropout:g}" if dropout >= 0 else ""
    command = (f"ubsmoe bench tiers --backbone {backbone} --batch-size {batch_size} --max-length {max_length} "
               f"--repeats {repeats} --part-repeats {part_repeats} --threads {threads}{dropout_option} --out {out}"
               + "".join(f" {item}" for item in overrides))
    result = {"benchmark": "tiers", "command": command, "backbone": backbone, "batch_size": batch_size,
              "max_length": max_length,
              "threads": threads, "steps_per_turn": STEPS_PER_TURN,
              "dropout": "checkpoint" if dropout < 0 else dropout,
              "repeats": repeats, "part_repeats": part_repeats, "overrides": list(overrides), "torch": torch.__version__,
              "methods": {}}
    for name in methods:
        tiers = {str(b): {"train_flops": flops[f"{name}@{b}"], "median_s": statistics.median(times[f"{name}@{b}"]),
                          "step_s": times[f"{name}@{b}"],
                          "parts_s": {p: statistics.median(t[p] for t in parts[f"{name}@{b}"]) for p in PARTS}}
                 for b in BUDGETS}
        low, high = tiers[str(BUDGETS[0])], tiers[str(BUDGETS[-1])]
        paired = [1 - lo / hi for lo, hi in zip(low["step_s"], high["step_s"])]
        result["methods"][name] = {
            "num_experts": setups[name].model.num_experts, "tiers": tiers,
            "low_tier_reduction": {"train_flops": 1 - low["train_flops"] / high["train_flops"],
                                   "step_time": 1 - low["median_s"] / high["median_s"],
                                   "step_time_paired": statistics.median(paired),
                                   "step_time_paired_quartiles": _quartiles(paired)},
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(to_markdown(result))
    return result


def _quartiles(values: list[float]) -> list[float]:
    """[first, third] quartile; a single round's value stands for both."""
    return statistics.quantiles(values, n=4)[::2] if len(values) > 1 else values * 2


def goal_verdicts(result: dict) -> list[str]:
    """One line per goal, met or not, from the same-round ratios (the steadier reading); one decimal, so
    that a value just under a goal does not read as the goal."""
    methods, lines = result["methods"], []
    if "ubsmoe" in methods:
        r = methods["ubsmoe"]["low_tier_reduction"]
        goals = (("FLOPs", r["train_flops"], GOAL_FLOP_SAVING), ("step time", r["step_time_paired"], GOAL_TIME_SAVING))
        for what, value, goal in goals:
            lines.append(f"ubsmoe low tier, {what}: {value:.1%} against at least {goal:.0%}: "
                         f"{'met' if value >= goal else 'not met'}")
    if "hetlora" in methods:
        value = methods["hetlora"]["low_tier_reduction"]["step_time_paired"]
        lines.append(f"hetlora low tier, step time: {value:.1%} against under {HETLORA_TIME_SAVING_BELOW:.0%}: "
                     f"{'met' if value < HETLORA_TIME_SAVING_BELOW else 'not met'}")
    return lines


def time_goal_budget(result: dict) -> str | None:
    """What the step-time goal asks of UB-SMoE's low tier, read from the hooked turns' parts: the time
    left for the parts that shrink with K once the others are paid for. None without those parts."""
    entry = result["methods"].get("ubsmoe")
    if entry is None or "parts_s" not in entry["tiers"][str(BUDGETS[0])]:
        return None
    low, high = entry["tiers"][str(BUDGETS[0])]["parts_s"], entry["tiers"][str(BUDGETS[-1])]["parts_s"]
    allowed = (1 - GOAL_TIME_SAVING) * sum(high.values())
    fixed = low["optimizer"] + low["rest"]
    scaling = low["ffn_forward"] + low["ffn_backward"] + low["method_gradients"]
    return (f"With timing hooks on, the top tier's step takes {sum(high.values()) * 1e3:.0f} ms, so a "
            f"{GOAL_TIME_SAVING:.0%} saving asks at most {allowed * 1e3:.0f} ms of the low tier. Its parts that "
            f"do not depend on K (optimiser and rest) take {fixed * 1e3:.0f} ms, which leaves "
            f"{(allowed - fixed) * 1e3:.0f} ms for its FFN layers and the method's gradient work; "
            f"they take {scaling * 1e3:.0f} ms.")


def _parts_table(result: dict) -> list[str]:
    if not all("parts_s" in t for entry in result["methods"].values() for t in entry["tiers"].values()):
        return []
    lines = ["", f"Where a step's time goes (ms; median of {result.get('part_repeats', '?')} turns with timing hooks, "
                 "run apart from the timed turns). Rest: attention, norms, dropouts, embeddings, head, loss, "
                 "autograd; the same work in every tier.", "",
             "| method | tier | FFN forward | FFN backward | method's gradient work | optimiser | rest | step |",
             "|---|---|---|---|---|---|---|---|"]
    for name, entry in result["methods"].items():
        for tier, t in entry["tiers"].items():
            cells = " | ".join(f"{t['parts_s'][p] * 1e3:.0f}" for p in PARTS)
            lines.append(f"| {name} | β={tier} | {cells} | {sum(t['parts_s'].values()) * 1e3:.0f} |")
    budget = time_goal_budget(result)
    return lines + (["", budget] if budget else [])


def to_markdown(result: dict) -> str:
    lines = [f"# One local step per tier ({result.get('backbone', 'minilm')}, batch {result['batch_size']} x "
             f"{result['max_length']} tokens, "
             f"{result['threads']} threads, median of {result['repeats']} turns of {result['steps_per_turn']} steps, "
             f"backbone dropout: {result['dropout']})", "",
             *([f"Made by `{result['command']}`.", ""] if result.get("command") else
               [f"Settings: `{' '.join(result['overrides'])}`", ""] if result.get("overrides") else []),
             "| method | tier | training FLOPs | median step ms | GFLOP/s |", "|---|---|---|---|---|"]
    for name, entry in result["methods"].items():
        for tier, t in entry["tiers"].items():
            lines.append(f"| {name} | β={tier} | {t['train_flops'] / 1e9:.1f} G | {t['median_s'] * 1e3:.0f} | "
                         f"{t['train_flops'] / t['median_s'] / 1e9:.0f} |")
    lines += ["", "| method | low tier saves, FLOPs | low tier saves, step time (medians) "
                  "| same-round ratio: median [quartiles] |", "|---|---|---|---|"]
    for name, entry in result["methods"].items():
        r = entry["low_tier_reduction"]
        q1, q3 = r["step_time_paired_quartiles"]
        lines.append(f"| {name} | {r['train_flops']:.0%} | {r['step_time']:.0%} | "
                     f"{r['step_time_paired']:.0%} [{q1:.0%}, {q3:.0%}] |")
    lines += ["", f"Goal: the sparse low tier (K = 2 of 8) saves at least {GOAL_FLOP_SAVING:.0%} of the FLOPs and "
                  f"{GOAL_TIME_SAVING:.0%} of the step time; the heterogeneous-rank low tier saves under "
                  f"{HETLORA_TIME_SAVING_BELOW:.0%}."]
    verdicts = goal_verdicts(result)
    if verdicts:
        lines += [""] + [f"- {v}" for v in verdicts]
    lines += _parts_table(result)
    return "\n".join(lines) + "\n"
