"""UB-SMoE against naive sparse MoE and its ablations on the default setting, over seeds.

    python benchmarks/ubsmoe_evidence.py --out runs/evidence [--seeds 0 1 2]

Runs (resuming: finished runs are skipped) smoe, ubsmoe, ubsmoe without PG and ubsmoe without DMR
with the default config, then writes OUT/evidence.json and OUT/evidence.md: per-tier accuracy, the
mean CV of the expert load over layers (global training load, and the beta = 0.25 tier's test
load), mean +- std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "smoe": ["--method", "smoe"],
    "ubsmoe": ["--method", "ubsmoe"],
    "ubsmoe-nopg": ["--method", "ubsmoe", "method.pg=false"],
    "ubsmoe-nodmr": ["--method", "ubsmoe", "method.dmr=false"],
}


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.pstdev(values):.4f}"


def summarise(out: Path, seeds: list[int]) -> dict:
    summary = {}
    for name in VARIANTS:
        runs = [json.loads((out / f"{name}-s{s}" / "results.json").read_text()) for s in seeds
                if (out / f"{name}-s{s}" / "results.json").is_file()]
        if not runs:
            continue
        tiers = list(runs[0]["final"]["tier_accuracy"])
        summary[name] = {
            "seeds": len(runs),
            "tier_accuracy": {t: [r["final"]["tier_accuracy"][t] for r in runs] for t in tiers},
            "average_accuracy": [r["final"]["average_accuracy"] for r in runs],
            "train_load_cv": [r["final"]["balance"]["train"]["mean_cv"] for r in runs],
            "low_tier_load_cv": [r["final"]["balance"]["tiers"][tiers[0]]["mean_cv"] for r in runs],
        }
    return summary


def to_markdown(summary: dict) -> str:
    tiers = list(next(iter(summary.values()))["tier_accuracy"])
    lines = ["# UB-SMoE against naive sparse MoE and its ablations, default setting, mean ± std over seeds", "",
             "BBC News, upcycled MiniLM (M = 8), 8 clients in tiers K = 2/4/6/8, 5 rounds. Produced by "
             "`python benchmarks/ubsmoe_evidence.py --out runs/evidence`. Load CV: mean over layers of the "
             "coefficient of variation of the expert load (0 = balanced).", "",
             "| method | seeds | " + " | ".join(f"beta={t}" for t in tiers)
             + " | average | load CV, training | load CV, beta=" + tiers[0] + " test |",
             "|---" * (len(tiers) + 5) + "|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['seeds']} | " + " | ".join(mean_std(s["tier_accuracy"][t]) for t in tiers)
                     + f" | {mean_std(s['average_accuracy'])} | {mean_std(s['train_load_cv'])}"
                     + f" | {mean_std(s['low_tier_load_cv'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--summarise-only", action="store_true")
    args = parser.parse_args()
    if not args.summarise_only:
        for seed in args.seeds:
            for name, extra in VARIANTS.items():
                folder = args.out / f"{name}-s{seed}"
                if (folder / "results.json").is_file():
                    continue
                # options first, then every key=value override together (argparse takes one run of them)
                options = [a for a in extra if "=" not in a]
                overrides = [a for a in extra if "=" in a]
                subprocess.run([sys.executable, "-m", "ubsmoe", "run", "--quiet", "--out", str(folder), *options,
                                f"seed={seed}", *overrides], check=True)
    summary = summarise(args.out, args.seeds)
    (args.out / "evidence.json").write_text(json.dumps(summary, indent=2))
    (args.out / "evidence.md").write_text(to_markdown(summary))
    print(to_markdown(summary))


if __name__ == "__main__":
    main()
