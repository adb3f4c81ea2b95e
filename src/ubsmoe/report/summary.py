"""A run's results on disk (results.json) and as a markdown summary and a console table."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(results: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "summary.md").write_text(summary_markdown(results))


def tier_table(results: dict) -> str:
    """The final per-tier accuracy as a markdown table (one row)."""
    final = results["final"]
    tiers = list(final["tier_accuracy"])
    header = "| method | " + " | ".join(f"beta={t}" for t in tiers) + " | average |"
    rule = "|---" * (len(tiers) + 2) + "|"
    row = (f"| {results['method']} | " + " | ".join(f"{final['tier_accuracy'][t]:.4f}" for t in tiers)
           + f" | {final['average_accuracy']:.4f} |")
    return "\n".join([header, rule, row])


def summary_markdown(results: dict) -> str:
    config = results["config"]
    lines = [
        f"# {results['method']} on {config['data']['dataset']}",
        "",
        f"Backbone {config['model']['backbone']}, M={config['model']['num_experts']} experts "
        f"(K_max={results['k_max']}), LoRA r={config['model']['lora_rank']}; "
        f"{config['federation']['num_clients']} clients, {config['federation']['rounds']} rounds, "
        f"{config['federation']['partition']} split; {results['num_train']} train / {results['num_test']} test "
        f"samples; {results['runtime_s']:.0f} s.",
        "",
        "## Final accuracy per budget tier",
        "",
        tier_table(results),
        "",
        "## Accuracy per round",
        "",
        "| round | " + " | ".join(f"beta={t}" for t in results["final"]["tier_accuracy"]) + " | average | test loss |",
        "|---" * (len(results["final"]["tier_accuracy"]) + 3) + "|",
    ]
    for entry in results["history"]:
        lines.append(f"| {entry['round']} | " + " | ".join(f"{a:.4f}" for a in entry["tier_accuracy"].values())
                     + f" | {entry['average_accuracy']:.4f} | {entry['test_loss']:.4f} |")
    lines += ["", "Trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in results["parameters"].items()), ""]
    return "\n".join(lines)
