"""What Flower costs: the default experiment's wall time under Flower's simulation against the
in-process engine, in one run, and whether their numbers agree.

    ubsmoe bench flower-overhead --out benchmarks/flower_overhead.json

Both runs use the same config (the defaults, ``threads`` CPU threads; ``key=value`` overrides after
the options). The in-process engine runs first, then Flower's simulation (one SuperNode per client,
ClientApps in Ray worker processes with ``threads`` threads each, as many at once as the CPUs allow).
``time_ratio`` is Flower's wall time over the in-process engine's; the goal is at most 1.3.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ubsmoe.config import load_config
from ubsmoe.engine.run_records import RunResults

GOAL_TIME_RATIO = 1.3


def numbers(results: RunResults) -> list[tuple]:
    """Per round: tier accuracies and losses and the clients' train losses (what must agree)."""
    return [(r.tier_accuracy, r.tier_loss, [c.train_loss for c in r.clients]) for r in results.history]


def run(out: Path, threads: int = 2, overrides: tuple[str, ...] = ()) -> dict:
    from ubsmoe.engine.flower.simulation import run_flower_simulation
    from ubsmoe.engine.rounds import run_experiment

    config = load_config(overrides=[f"threads={threads}", *overrides])
    started = time.perf_counter()
    in_process = run_experiment(config, show_progress=False)
    in_process_s = time.perf_counter() - started
    started = time.perf_counter()
    flower = run_flower_simulation(config, show_progress=False)
    flower_s = time.perf_counter() - started
    result = {
        "benchmark": "flower-overhead", "command": "ubsmoe bench flower-overhead --out " + str(out),
        "overrides": [f"threads={threads}", *overrides], "method": config.method_name,
        "clients": config.federation.num_clients, "rounds": config.federation.rounds, "threads": threads,
        "inprocess_s": in_process_s, "flower_sim_s": flower_s, "time_ratio": flower_s / in_process_s,
        "goal_time_ratio": GOAL_TIME_RATIO, "meets_goal": flower_s / in_process_s <= GOAL_TIME_RATIO,
        "same_numbers": numbers(flower) == numbers(in_process),
        "final_average_accuracy": {"inprocess": in_process.final.average_accuracy,
                                   "flower_sim": flower.final.average_accuracy},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(
        "# Flower overhead\n\n"
        f"`{result['command']}` ({', '.join(result['overrides'])}): the default experiment ({config.method_name}, "
        f"{result['clients']} clients, {result['rounds']} rounds) under the in-process engine, then under Flower's "
        "simulation, in one run.\n\n"
        "| engine | wall time | final average accuracy |\n|---|---|---|\n"
        f"| in-process | {in_process_s:.0f} s | {result['final_average_accuracy']['inprocess']:.4f} |\n"
        f"| Flower simulation | {flower_s:.0f} s | {result['final_average_accuracy']['flower_sim']:.4f} |\n\n"
        f"time_ratio (Flower / in-process): **{result['time_ratio']:.2f}** (goal: at most {GOAL_TIME_RATIO}); "
        f"the same numbers in both: {'yes' if result['same_numbers'] else 'NO'}.\n")
    return result
