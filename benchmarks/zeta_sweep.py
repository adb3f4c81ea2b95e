"""DMR's smoothing zeta swept on a reduced default setting, and runs with every client in the low tier.

    python benchmarks/zeta_sweep.py --out runs/zeta [--jobs 2]

Seed 0, 600 training and 300 test BBC News texts, 4 rounds, one thread per run (``--jobs`` runs side by
side; finished runs are skipped, so an interrupted sweep resumes). Runs: smoe; ubsmoe with
method.zeta in {0, 0.25, 0.5, 0.75, 0.9}; and smoe and ubsmoe (zeta 0.5) with federation.budgets=0.25,
every client at K = 2. Writes OUT/zeta_sweep.json and OUT/zeta_sweep.md: per run the low tier's and the
average accuracy, and the mean over layers of the expert-load CV in training and on the low tier's test
routing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

COMMON = ["threads=1", "seed=0", "data.max_train_samples=600", "data.max_test_samples=300", "federation.rounds=4"]
ZETAS = (0.0, 0.25, 0.5, 0.75, 0.9)
LOW_ONLY = "federation.budgets=0.25"


def plan() -> dict[str, tuple[str, float | None, list[str]]]:
    """run name -> (method, zeta or None, overrides beyond COMMON)."""
    runs = {"smoe": ("smoe", None, [])}
    runs |= {f"z{z}": ("ubsmoe", z, [f"method.zeta={z}"]) for z in ZETAS}
    runs["low-smoe"] = ("smoe", None, [LOW_ONLY])
    runs["low-ubsmoe"] = ("ubsmoe", 0.5, [LOW_ONLY, "method.zeta=0.5"])
    return runs


def launch(out: Path, runs: dict, jobs: int) -> None:
    """Run every unfinished run, at most ``jobs`` at a time; stop at the first failure."""
    waiting = [name for name in runs if not (out / name / "results.json").is_file()]
    active: list[tuple[str, subprocess.Popen]] = []
    while waiting or active:
        while waiting and len(active) < jobs:
            name = waiting.pop(0)
            method, _, extra = runs[name]
            command = [sys.executable, "-m", "ubsmoe", "run", "--quiet", "--method", method, "--out", str(out / name),
                       *COMMON, *extra]
            print(f"started {name}", flush=True)
            active.append((name, subprocess.Popen(command)))
        time.sleep(1.0)
        for name, process in list(active):
            if process.poll() is not None:
                active.remove((name, process))
                if process.returncode != 0:
                    for _, other in active:
                        other.terminate()
                    raise SystemExit(f"run {name} failed (exit {process.returncode}); rerun to resume")
                print(f"finished {name}", flush=True)


def summarise(out: Path, runs: dict) -> list[dict]:
    rows = []
    for name, (method, zeta, _) in runs.items():
        final = json.loads((out / name / "results.json").read_text())["final"]
        tiers = list(final["tier_accuracy"])
        rows.append({"run": name, "method": method, "zeta": zeta, "budgets": [float(t) for t in tiers],
                     "tier_accuracy": final["tier_accuracy"], "average_accuracy": final["average_accuracy"],
                     "train_load_cv": final["balance"]["train"]["mean_cv"],
                     "low_tier_test_load_cv": final["balance"]["tiers"][tiers[0]]["mean_cv"]})
    return rows


def to_markdown(rows: list[dict]) -> str:
    lines = ["# zeta sweep and low-tier-only runs (seed 0; 600 train / 300 test BBC News samples, 4 rounds, "
             "threads=1)", "",
             "Produced by `python benchmarks/zeta_sweep.py --out runs/zeta`; each run is `ubsmoe run --method M "
             + " ".join(COMMON) + "` plus `method.zeta=Z` (ubsmoe) and, for the low-* runs, `" + LOW_ONLY
             + "` (every client at K = 2). Load CV: mean over layers of the coefficient of variation of the "
             "expert load (0 = balanced).", "",
             "| run | method | zeta | tiers | beta=0.25 acc | average acc | load CV, training | load CV, beta=0.25 test |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        zeta = "-" if r["zeta"] is None else f"{r['zeta']}"
        tiers = ",".join(str(b) for b in r["budgets"])
        low = r["tier_accuracy"][next(iter(r["tier_accuracy"]))]
        lines.append(f"| {r['run']} | {r['method']} | {zeta} | {tiers} | {low:.3f} | {r['average_accuracy']:.3f} | "
                     f"{r['train_load_cv']:.3f} | {r['low_tier_test_load_cv']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=2, help="runs side by side (each uses one thread)")
    args = parser.parse_args()
    runs = plan()
    launch(args.out, runs, max(1, args.jobs))
    rows = summarise(args.out, runs)
    (args.out / "zeta_sweep.json").write_text(json.dumps(rows, indent=2))
    (args.out / "zeta_sweep.md").write_text(to_markdown(rows))
    print(to_markdown(rows))


if __name__ == "__main__":
    main()
