"""``ubsmoe compare`` and ``ubsmoe report``: several methods over seeds, one report.

A comparison folder holds one run folder per (method, seed), ``<method>-s<seed>/results.json``, and the
report built from them: ``compare.json`` (every number), ``report.md`` and a self-contained
``report.html`` (plots embedded as PNG data, no network needed).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from ubsmoe.config import load_config
from ubsmoe.report.summary import human, write_results

HETEROGENEOUS_RANK = ("hetlora", "flexlora", "flora", "florist")


def run_folder(out: Path, method: str, seed: int) -> Path:
    return out / f"{method}-s{seed}"


def run_comparison(methods: list[str], seeds: list[int], out: Path, config_path: str | None = None,
                   overrides: list[str] | None = None, show_progress: bool = True) -> dict:
    """Run every (method, seed) not finished yet in ``out``, one after another, then write the report."""
    from ubsmoe.engine.simulation import run_experiment

    configs = {(m, s): load_config(config_path, list(overrides or []) + [f"seed={s}"], method=m)
               for m in methods for s in seeds}  # every config is checked before anything runs
    out.mkdir(parents=True, exist_ok=True)
    for (method, seed), config in configs.items():
        folder = run_folder(out, method, seed)
        if (folder / "results.json").is_file():
            if show_progress:
                print(f"{folder.name}: finished earlier, skipped")
            continue
        if show_progress:
            print(f"{folder.name}: running")
        write_results(run_experiment(config, show_progress=show_progress), folder)
    return build_report(out, methods, seeds)


def load_runs(out: Path, methods: list[str] | None = None, seeds: list[int] | None = None) -> dict[str, list[dict]]:
    """{method: [results of each seed]} from the run folders in ``out`` (all of them by default)."""
    runs: dict[str, list[dict]] = {}
    for path in sorted(out.glob("*/results.json")):
        results = json.loads(path.read_text())
        seed = results["config"]["seed"]
        if (methods and results["method"] not in methods) or (seeds and seed not in seeds):
            continue
        runs.setdefault(results["method"], []).append(results)
    if methods:
        runs = {m: runs[m] for m in methods if m in runs}
    else:  # a rebuilt report keeps the order the comparison gave its methods; new methods follow by name
        order = [m for m in _saved_method_order(out) if m in runs]
        runs = {m: runs[m] for m in order + [m for m in runs if m not in order]}
    if not runs:
        raise FileNotFoundError(f"no finished runs (*/results.json) in {out}; run `ubsmoe compare` first")
    return runs


def _saved_method_order(out: Path) -> list[str]:
    """The methods of ``out/compare.json`` in their order; none when the file is missing or unreadable."""
    try:
        return list(json.loads((out / "compare.json").read_text())["methods"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per method: seeds, per-tier and average accuracy (mean, std), accuracy per round, cost per tier
    (means over seeds), the low tier's reductions and the final expert load per tier; then the headline
    figures."""
    methods = {}
    for method, results in runs.items():
        tiers = list(results[0]["final"]["tier_accuracy"])
        rounds = len(results[0]["history"])
        entry = {
            "seeds": [r["config"]["seed"] for r in results],
            "tiers": tiers,
            "accuracy": {t: _mean_std([r["final"]["tier_accuracy"][t] for r in results]) for t in tiers},
            "average": _mean_std([r["final"]["average_accuracy"] for r in results]),
            "accuracy_per_round": {t: [statistics.mean(r["history"][i]["tier_accuracy"][t] for r in results)
                                       for i in range(rounds)] for t in tiers},
        }
        if all("cost" in r for r in results):
            entry["cost"] = {t: {k: statistics.mean(r["cost"]["tiers"][t][k] for r in results)
                                 for k in results[0]["cost"]["tiers"][t]} for t in tiers}
            keys = results[0]["cost"]["low_tier_reduction"]
            entry["low_tier_reduction"] = {k: statistics.mean(r["cost"]["low_tier_reduction"][k] for r in results)
                                           for k in keys}
        if "tier_expert_load" in results[0]["final"]:
            entry["expert_load"] = {t: _mean_matrix([r["final"]["tier_expert_load"][t] for r in results]) for t in tiers}
            entry["load_cv"] = {t: statistics.mean(r["final"]["balance"]["tiers"][t]["mean_cv"] for r in results)
                                for t in tiers}
        methods[method] = entry
    return {"methods": methods, "headline": headline(methods)}


def _mean_matrix(matrices: list[list[list[float]]]) -> list[list[float]]:
    return [[statistics.mean(m[i][j] for m in matrices) for j in range(len(matrices[0][0]))]
            for i in range(len(matrices[0]))]


def headline(methods: dict) -> dict:
    """The low tier's compute reduction for each method, and UB-SMoE's low-resource gain: its lowest-tier
    accuracy divided by the best heterogeneous-rank method's."""
    result: dict = {"low_tier_reduction": {m: e.get("low_tier_reduction", {}) for m, e in methods.items()}}
    if "ubsmoe" in methods:
        low = methods["ubsmoe"]["tiers"][0]
        rivals = {m: methods[m]["accuracy"][low]["mean"] for m in HETEROGENEOUS_RANK if m in methods}
        if rivals:
            best = max(rivals, key=rivals.get)
            result["low_resource_gain"] = {"tier": low, "ubsmoe": methods["ubsmoe"]["accuracy"][low]["mean"],
                                           "best_heterogeneous_rank": best, "its_accuracy": rivals[best],
                                           "gain": methods["ubsmoe"]["accuracy"][low]["mean"] / rivals[best]
                                           if rivals[best] > 0 else float("inf")}
    return result


# ---------------------------------------------------------------------------------------- tables
def tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table of the report."""
    methods = summary["methods"]
    tiers = next(iter(methods.values()))["tiers"]
    fmt = lambda s: f"{s['mean']:.4f} ± {s['std']:.4f}"  # noqa: E731
    main = ("Accuracy per budget tier (mean ± std over seeds)",
            ["method", "seeds"] + [f"β={t}" for t in tiers] + ["average"],
            [[m, str(len(e["seeds"]))] + [fmt(e["accuracy"][t]) for t in tiers] + [fmt(e["average"])]
             for m, e in methods.items()])
    result = [main]
    cost_rows = []
    for m, e in methods.items():
        for t in tiers:
            c = e.get("cost", {}).get(t)
            if c and "train_flops" in c:
                cost_rows.append([m, f"β={t}", human(c["train_flops"]), human(c["train_flops_per_token"]),
                                  human(c["inference_flops_per_token"]), f"{c['step_seconds_median'] * 1e3:.0f} ms",
                                  human(c["download_bytes"] + c["upload_bytes"], "B")])
    if cost_rows:
        result.append(("Cost per tier (per client and round)", ["method", "tier", "train FLOPs", "train FLOPs / token",
                                                                 "inference FLOPs / token", "median step", "bytes"],
                       cost_rows))
    reductions = [[m, *(f"{e['low_tier_reduction'].get(k, float('nan')):.0%}" for k in
                        ("train_flops_per_token", "step_seconds_median", "inference_flops_per_token"))]
                  for m, e in methods.items() if e.get("low_tier_reduction")]
    if reductions:
        result.append(("Low tier's compute reduction against the top tier",
                       ["method", "train FLOPs / token", "measured step time", "inference FLOPs / token"], reductions))
    gain = summary["headline"].get("low_resource_gain")
    if gain:
        result.append(("Low-resource gain", ["tier", "UB-SMoE", "best heterogeneous-rank method", "its accuracy", "gain"],
                       [[f"β={gain['tier']}", f"{gain['ubsmoe']:.4f}", gain["best_heterogeneous_rank"],
                         f"{gain['its_accuracy']:.4f}", f"{gain['gain']:.2f}x"]]))
    balance = [[m] + [f"{e['load_cv'][t]:.3f}" for t in tiers] for m, e in methods.items() if "load_cv" in e]
    if balance:
        result.append(("Expert load imbalance on the test set (mean CV over layers; 0 = balanced)",
                       ["method"] + [f"β={t}" for t in tiers], balance))
    return result


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def html_table(header: list[str], rows: list[list[str]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------------------------- the report
def build_report(out: Path, methods: list[str] | None = None, seeds: list[int] | None = None) -> dict:
    """Write compare.json, report.md, report.html and the plots (plots/*.png) from the runs in ``out``."""
    from ubsmoe.report.plots import make_plots

    summary = summarise(load_runs(out, methods, seeds))
    (out / "compare.json").write_text(json.dumps(summary, indent=2))
    plots = make_plots(summary, out / "plots")
    all_tables = tables(summary)
    md = ["# Comparison", ""]
    for title, header, rows in all_tables:
        md += [f"## {title}", "", *markdown_table(header, rows), ""]
    md += ["## Plots", ""] + [f"![{title}](plots/{path.name})" for title, path in plots] + [""]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(report_html(all_tables, plots))
    return summary


def report_html(all_tables, plots) -> str:
    import base64
    from html import escape

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>ubsmoe comparison</title><style>",
             "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}",
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}",
             "img{max-width:100%;margin:1em 0}</style></head><body><h1>Comparison</h1>"]
    for title, header, rows in all_tables:
        parts.append(f"<h2>{escape(title)}</h2>{html_table(header, rows)}")
    for title, path in plots:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{escape(title)}</h2><img alt='{escape(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
