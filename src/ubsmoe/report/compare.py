"""``ubsmoe compare`` and ``ubsmoe report``: several methods, or variants of one, over seeds, one report.

A comparison folder holds one run folder per (variant, seed), ``<variant>-s<seed>/results.json``, and the
report built from them: ``compare.json`` (every number), ``report.md`` and a self-contained
``report.html`` (plots embedded as PNG data, no network needed). Variants are methods with settings
(``ubsmoe:pg=false``, see ``report.variants``); a plain method name is a variant without settings.
"""

from __future__ import annotations

import json
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from ubsmoe.config import ConfigError, ExperimentConfig, MissingFileError, differing_keys, load_config, resolve_method_options
from ubsmoe.engine.run_folder import human, read_results, shared_note
from ubsmoe.engine.run_records import RunResults, TierCost
from ubsmoe.report.uncertainty import (beyond_two_se, ratio_interval, summarise_uncertainty, task_baselines,
                                       uncertainty_tables)
from ubsmoe.report.variants import Variant, parse_variant


def plan_runs(variants: list[Variant], seeds: list[int], config_path: str | None = None,
              overrides: list[str] | None = None) -> dict[tuple[str, int], ExperimentConfig]:
    """The resolved config of every (variant label, seed), every key and method option checked."""
    from ubsmoe.engine.experiment import validate
    from ubsmoe.methods import get_method

    configs = {}
    for variant in variants:
        try:
            method = get_method(variant.method)
        except KeyError as error:
            raise ConfigError(f"variant {variant.label!r}: {error.args[0]}") from None
        for seed in seeds:
            config = load_config(config_path, list(overrides or []) + list(variant.overrides) + [f"seed={seed}"],
                                 method=variant.method)
            try:
                resolve_method_options(config, method.Options)
            except ValueError as error:  # a method's options check their values in __post_init__
                raise ConfigError(f"variant {variant.label!r}: {error}") from None
            validate(config)
            configs[(variant.label, seed)] = config
    return configs


def finished_run(folder: Path, config: ExperimentConfig) -> bool:
    """Whether ``folder`` holds a finished run of exactly ``config``; a finished run of another config, or an
    unreadable results file, is an error that names the file."""
    path = folder / "results.json"
    if not path.is_file():
        return False
    try:
        stored = json.loads(path.read_text())["config"]
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path} is unreadable ({error}); delete it to run that variant again") from None
    differing = differing_keys(stored, config)
    if differing:
        raise ConfigError(f"{path} holds a run with another config (differing keys: {', '.join(differing)}); "
                          "use another --out folder, or delete that run to replace it")
    return True


def run_comparison(variants: list[Variant | str], seeds: list[int], out: Path, config_path: str | None = None,
                   overrides: list[str] | None = None, show_progress: bool = True, jobs: int = 1) -> dict:
    """Run every (variant, seed) not finished yet in ``out`` (``jobs`` at a time, each in its own process
    when jobs > 1), then write the report. Every config is checked before the first run."""
    variants = [parse_variant(v) if isinstance(v, str) else v for v in variants]
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {jobs}")
    configs = plan_runs(variants, seeds, config_path, overrides)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder: choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    pending = []
    for variant in variants:
        for seed in seeds:
            folder = out / variant.folder(seed)
            if finished_run(folder, configs[(variant.label, seed)]):
                if show_progress:
                    print(f"{folder.name}: finished earlier, skipped")
                continue
            pending.append((configs[(variant.label, seed)], folder, variant.label))
    if jobs == 1:
        for config, folder, label in pending:
            if show_progress:
                print(f"{folder.name}: running")
            run_one(config, folder, label, show_progress)
    elif pending:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_one, config, folder, label, False): folder for config, folder, label in pending}
            try:
                for done, future in enumerate(as_completed(futures), 1):
                    future.result()  # a failed run stops the comparison with its own error
                    if show_progress:
                        print(f"{futures[future].name}: finished ({done}/{len(futures)})")
            except BaseException:  # runs not started yet are dropped; finished ones stay on disk
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    return build_report(out, [v.label for v in variants], seeds)


def run_one(config: ExperimentConfig, folder: Path, label: str, show_progress: bool) -> None:
    """One run of the comparison, written to ``folder`` with its variant's label."""
    from ubsmoe.engine.checkpoint import CHECKPOINT, read_checkpoint
    from ubsmoe.engine.rounds import run_experiment

    resume = read_checkpoint(folder) if (folder / CHECKPOINT).is_file() else None  # an interrupted run goes on
    run_experiment(config, show_progress=show_progress, out=folder, resume=resume, variant=label)


def load_runs(out: Path, methods: list[str] | None = None, seeds: list[int] | None = None
              ) -> dict[str, list[RunResults]]:
    """{variant label: [results of each seed]} from the run folders in ``out`` (all of them by default);
    runs written before variants existed are labelled by their method."""
    runs: dict[str, list[RunResults]] = {}
    for path in sorted(out.glob("*/results.json")):
        results = read_results(path.parent)
        label, seed = results.label, results.config["seed"]
        if (methods and label not in methods) or (seeds and seed not in seeds):
            continue
        runs.setdefault(label, []).append(results)
    if methods:
        runs = {m: runs[m] for m in methods if m in runs}
    else:  # a rebuilt report keeps the order the comparison gave its methods; new methods follow by name
        order = [m for m in _saved_method_order(out) if m in runs]
        runs = {m: runs[m] for m in order + [m for m in runs if m not in order]}
    if not runs:
        raise MissingFileError(f"no finished runs (*/results.json) in {out}; run `ubsmoe compare` first")
    return runs


def _saved_method_order(out: Path) -> list[str]:
    """The methods of ``out/compare.json`` in their order; none when the file is missing or unreadable."""
    try:
        return list(json.loads((out / "compare.json").read_text())["methods"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def _mean_cost(costs: list[TierCost]) -> dict[str, float]:
    """The means over seeds of a tier's cost figures (those every seed has)."""
    keys = [k for k, v in vars(costs[0]).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: statistics.mean(getattr(c, k) for c in costs) for k in keys if all(getattr(c, k) is not None for c in costs)}


def summarise(runs: dict[str, list[RunResults]]) -> dict:
    """Per variant: its method, seeds, per-tier and average accuracy (mean, std), accuracy per round, cost
    per tier (means over seeds), the low tier's reductions, the final expert load per tier and the
    training load's CV; then the headline figures and the differences beyond one standard deviation."""
    methods = {}
    for method, results in runs.items():
        first = results[0]
        tiers = list(first.final.tier_accuracy)
        rounds = len(first.history)
        entry = {
            "method": first.method,
            "seeds": [r.config["seed"] for r in results],
            "tiers": tiers,
            "accuracy": {t: _mean_std([r.final.tier_accuracy[t] for r in results]) for t in tiers},
            "average": _mean_std([r.final.average_accuracy for r in results]),
            "accuracy_per_round": {t: [statistics.mean(r.history[i].tier_accuracy[t] for r in results)
                                       for i in range(rounds)] for t in tiers},
            "cost": {t: _mean_cost([r.cost.tiers[t] for r in results]) for t in tiers},
            "low_tier_reduction": {k: statistics.mean(r.cost.low_tier_reduction[k] for r in results)
                                   for k in first.cost.low_tier_reduction},
        }
        if first.final.tier_expert_load is not None and first.final.balance is not None:
            entry["expert_load"] = {t: _mean_matrix([r.final.tier_expert_load[t] for r in results]) for t in tiers}
            entry["load_cv"] = {t: statistics.mean(r.final.balance.tiers[t].mean_cv for r in results) for t in tiers}
            entry["train_load_cv"] = _mean_std([r.final.balance.train.mean_cv for r in results])
        methods[method] = entry
    summarise_uncertainty(runs, methods)
    return {"methods": methods, "headline": headline(methods), "beyond_one_std": beyond_one_std(methods),
            "beyond_two_se": beyond_two_se(methods) if len(methods) > 1 else [], "task_baselines": task_baselines(runs)}


def beyond_one_std(methods: dict) -> list[dict]:
    """Every (variant, tier or average) whose mean accuracy differs from the first variant's by more than
    the larger of the two standard deviations over seeds (needs two seeds or more)."""
    reference, *others = methods
    found = []
    for label in others:
        for key in methods[reference]["tiers"] + ["average"]:
            ours = methods[reference]["average"] if key == "average" else methods[reference]["accuracy"].get(key)
            theirs = methods[label]["average"] if key == "average" else methods[label]["accuracy"].get(key)
            if ours is None or theirs is None or min(len(methods[reference]["seeds"]), len(methods[label]["seeds"])) < 2:
                continue
            difference = theirs["mean"] - ours["mean"]
            if abs(difference) > max(ours["std"], theirs["std"]):
                found.append({"variant": label, "reference": reference, "tier": key, "difference": difference,
                              "std": max(ours["std"], theirs["std"])})
    return found


def _mean_matrix(matrices: list[list[list[float]]]) -> list[list[float]]:
    return [[statistics.mean(m[i][j] for m in matrices) for j in range(len(matrices[0][0]))]
            for i in range(len(matrices[0]))]


def headline(methods: dict) -> dict:
    """The low tier's compute reduction for each variant, and UB-SMoE's low-resource gain: its lowest-tier
    accuracy (the variant labelled ``ubsmoe``, else the first UB-SMoE variant) divided by the best
    heterogeneous-rank variant's."""
    from ubsmoe.methods import get_method
    from ubsmoe.methods.low_rank import HeterogeneousRankMethod

    result: dict = {"low_tier_reduction": {m: e.get("low_tier_reduction", {}) for m, e in methods.items()}}
    ours = "ubsmoe" if "ubsmoe" in methods else next((m for m, e in methods.items() if e["method"] == "ubsmoe"), None)
    if ours is not None:
        low = methods[ours]["tiers"][0]
        rivals = {m: e["accuracy"][low]["mean"] for m, e in methods.items()
                  if issubclass(get_method(e["method"]), HeterogeneousRankMethod) and low in e["accuracy"]}
        if rivals:
            best = max(rivals, key=rivals.get)
            accuracy = methods[ours]["accuracy"][low]["mean"]
            result["low_resource_gain"] = {"tier": low, "ubsmoe": accuracy, "ubsmoe_variant": ours,
                                           "best_heterogeneous_rank": best, "its_accuracy": rivals[best],
                                           "gain": accuracy / rivals[best] if rivals[best] > 0 else float("inf")}
            if "accuracy_se" in methods[ours]:
                result["low_resource_gain"]["interval_95"] = ratio_interval(
                    accuracy, methods[ours]["accuracy_se"][low], rivals[best], methods[best]["accuracy_se"][low])
    return result


def all_tiers(methods: dict) -> list[str]:
    """Every tier any variant reports, ascending (variants may run different tiers)."""
    return sorted({t for e in methods.values() for t in e["tiers"]}, key=float)


# ---------------------------------------------------------------------------------------- tables
def tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of every table of the report."""
    methods = summary["methods"]
    tiers = all_tiers(methods)
    fmt = lambda s: "–" if s is None else f"{s['mean']:.4f} ± {s['std']:.4f}"  # noqa: E731
    main = ("Accuracy per budget tier (mean ± std over seeds)",
            ["method", "seeds"] + [f"β={t}" for t in tiers] + ["average"],
            [[m, str(len(e["seeds"]))] + [fmt(e["accuracy"].get(t)) for t in tiers] + [fmt(e["average"])]
             for m, e in methods.items()])
    result = [main, *uncertainty_tables(summary)]
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
                         f"{gain['its_accuracy']:.4f}", f"{gain['gain']:.2f}x"
                         + (" (95 %: {:.2f}–{:.2f})".format(*gain["interval_95"]) if "interval_95" in gain else "")]]))
    balance = [[m, f"{e['train_load_cv']['mean']:.3f} ± {e['train_load_cv']['std']:.3f}"]
               + [f"{e['load_cv'][t]:.3f}" if t in e["load_cv"] else "–" for t in tiers]
               for m, e in methods.items() if "load_cv" in e]
    if balance:
        result.append(("Expert load imbalance (mean CV over layers; 0 = balanced): global training load of the "
                       "last round, and each tier on the test set", ["method", "training"]
                       + [f"test, β={t}" for t in tiers], balance))
    beyond = summary.get("beyond_one_std")
    if beyond is not None and len(methods) > 1:
        rows = [[d["variant"], d["tier"] if d["tier"] == "average" else f"β={d['tier']}", f"{d['difference']:+.4f}",
                 f"{d['std']:.4f}"] for d in beyond]
        reference = next(iter(methods))
        result.append((f"Accuracy differences from {reference} beyond one standard deviation (the larger of the "
                       "two over seeds)" + ("" if rows else ": none"), ["variant", "tier", "difference", "std"], rows))
    return result


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def html_table(header: list[str], rows: list[list[str]]) -> str:
    from html import escape

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ---------------------------------------------------------------------------------------- the report
def build_report(out: Path, methods: list[str] | None = None, seeds: list[int] | None = None,
                 to: Path | None = None) -> dict:
    """Write compare.json, report.md, report.html and the plots (plots/*.png) from the runs in ``out``, into
    ``to`` (``out`` by default)."""
    from ubsmoe.report.plots import make_plots

    runs = load_runs(out, methods, seeds)
    summary = summarise(runs)
    to = to or out
    if to.exists() and not to.is_dir():
        raise ConfigError(f"{to} is a file, not a folder: choose another --out")
    to.mkdir(parents=True, exist_ok=True)
    summary["setting"] = setting(runs)
    (to / "compare.json").write_text(json.dumps(summary, indent=2))
    plots = make_plots(summary, to / "plots")
    all_tables = tables(summary)
    md = ["# Comparison", "", summary["setting"], ""]
    for title, header, rows in all_tables:
        md += [f"## {title}", "", *markdown_table(header, rows), ""]
    md += ["## Plots", ""] + [f"![{title}](plots/{path.name})" for title, path in plots] + [""]
    (to / "report.md").write_text("\n".join(md))
    (to / "report.html").write_text(report_html(summary["setting"], all_tables, plots))
    return summary


def setting(runs: dict[str, list[RunResults]]) -> str:
    """One sentence on what the runs share, read from the first run (variants may change some of it)."""
    first = next(iter(runs.values()))[0]
    config = first.config
    model, federation = config["model"], config["federation"]
    duplicates = f", {first.duplicates_removed} duplicates removed"
    return (f"{config['data']['dataset']} ({first.num_train} train / {first.num_test} test texts{duplicates}), "
            f"backbone {model['backbone']} with M = {model['num_experts']} experts (K_max = {first.k_max}"
            f"{shared_note(first)}), "
            f"LoRA rank {model['lora_rank']}; {federation['num_clients']} clients in tiers β = "
            f"{', '.join(map(str, first.tiers))}, {federation['rounds']} rounds of {config['train']['local_steps']} "
            f"local steps (batch {config['train']['batch_size']}). Seeds: "
            f"{', '.join(str(s) for s in sorted({r.config['seed'] for rs in runs.values() for r in rs}))}.")


def report_html(setting_text: str, all_tables, plots) -> str:
    import base64
    from html import escape

    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>ubsmoe comparison</title><style>",
             "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}",
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
             "text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}",
             "img{max-width:100%;margin:1em 0}</style></head><body><h1>Comparison</h1>",
             f"<p>{escape(setting_text)}</p>"]
    for title, header, rows in all_tables:
        parts.append(f"<h2>{escape(title)}</h2>{html_table(header, rows)}")
    for title, path in plots:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{escape(title)}</h2><img alt='{escape(title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
