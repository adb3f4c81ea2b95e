"""How far a comparison's accuracies can be trusted: their standard errors over the draw of test questions,
differences beyond two of them, runs that have not arrived, and the baselines an accuracy must beat.

An accuracy is a share of n test questions answered right: its standard error is sqrt(p (1 - p) / n). A mean
over T tasks (causal-lm) has sqrt(sum_t p_t (1 - p_t) / n_t) / T. Every seed and every method is scored on
the same questions (``data.split_seed``), so a mean over seeds keeps one run's error: the formula at the
seeds' mean accuracy. Two accuracies differ beyond noise when |a - b| > 2 sqrt(SE_a^2 + SE_b^2): unpaired,
so conservative for methods scored on the same questions. A run has not arrived when its last two rounds
differ by more than one standard error.
"""

from __future__ import annotations

import math
import statistics

from ubsmoe.engine.run_records import RunResults

GENERATED = ("generation", "format")  # measured on the questions whose answers were generated


def proportion_error(p: float, n: int) -> float:
    """The standard error of a share p of n questions."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


def task_mean_error(details: dict[str, float], metric: str) -> float:
    """The standard error of a causal-lm tier's ``metric`` (its mean over tasks) from its per-task figures
    and counts; NaN for results written without counts."""
    tasks = sorted({key.rsplit("/", 1)[0] for key in details if key.endswith(f"/{metric}")})
    count = "generated" if metric in GENERATED else "questions"
    if not tasks or any(f"{t}/{count}" not in details for t in tasks):
        return float("nan")
    return math.sqrt(sum(details[f"{t}/{metric}"] * (1 - details[f"{t}/{metric}"]) / details[f"{t}/{count}"]
                         for t in tasks)) / len(tasks)


def mean_details(runs: list[RunResults], tier: str, round_index: int = -1) -> dict[str, float] | None:
    """A tier's task figures (causal-lm ``tier_details``) of one round, averaged over seeds; None without."""
    found = [(r.history[round_index].tier_details or {}).get(tier) for r in runs]
    if not found or any(d is None for d in found):
        return None
    return {key: statistics.mean(d[key] for d in found) for key in found[0]}


def accuracy_error(runs: list[RunResults], tier: str, round_index: int = -1) -> float:
    """The standard error of the seeds' mean headline accuracy of ``tier`` in one round."""
    details = mean_details(runs, tier, round_index)
    if details is not None:
        return task_mean_error(details, runs[0].config["evaluation"]["protocol"])
    accuracy = statistics.mean(r.history[round_index].tier_accuracy[tier] for r in runs)
    return proportion_error(accuracy, runs[0].num_test)


def ratio_interval(a: float, se_a: float, b: float, se_b: float) -> tuple[float, float]:
    """A 95 % interval of a / b (the delta method on log a - log b)."""
    if a <= 0 or b <= 0:
        return float("nan"), float("nan")
    spread = 1.96 * math.sqrt((se_a / a) ** 2 + (se_b / b) ** 2)
    return a / b * math.exp(-spread), a / b * math.exp(spread)


def summarise_uncertainty(runs: dict[str, list[RunResults]], methods: dict) -> None:
    """Add to each variant's entry of ``methods`` its tiers' standard errors (``accuracy_se``), the last two
    rounds' figures (``arrived``), and, for causal-lm, each protocol per tier with its error; then add
    ``beyond_two_se`` (differences from the first variant) and the baselines per task to ``methods``'s
    summary through the returned keys."""
    for label, results in runs.items():
        entry = methods[label]
        entry["accuracy_se"] = {t: accuracy_error(results, t) for t in entry["tiers"]}
        # the tiers are scored on the same questions, so their errors move together: the mean of the errors (the
        # error of the average when they are perfectly correlated), not the independent sqrt(sum se^2) / T
        entry["average_se"] = sum(entry["accuracy_se"].values()) / len(entry["tiers"])
        rounds = len(results[0].history)
        if rounds >= 2:
            entry["arrived"] = {}
            for t in entry["tiers"]:
                last, before = (statistics.mean(r.history[i].tier_accuracy[t] for r in results) for i in (-1, -2))
                se = entry["accuracy_se"][t]
                entry["arrived"][t] = {"last": last, "before": before, "se": se,
                                       "arrived": None if math.isnan(se) else abs(last - before) <= se}
        protocols = {}
        for t in entry["tiers"]:
            details = mean_details(results, t)
            if details is not None:
                protocols[t] = {metric: {"value": details[metric], "se": task_mean_error(details, metric)}
                                for metric in ("loglik", "generation", "format") if metric in details}
                protocols[t]["loss"] = statistics.mean(r.final.tier_loss[t] for r in results)
        if protocols:
            entry["protocols"] = protocols


def beyond_two_se(methods: dict) -> list[dict]:
    """Every (variant, tier or average) whose accuracy differs from the first variant's by more than two
    standard errors of the difference."""
    reference, *others = methods
    found = []
    for label in others:
        for key in methods[reference]["tiers"] + ["average"]:
            if key == "average":
                a, se_a = methods[reference]["average"]["mean"], methods[reference]["average_se"]
                b, se_b = methods[label]["average"]["mean"], methods[label]["average_se"]
            elif key in methods[label]["accuracy"]:
                a, se_a = methods[reference]["accuracy"][key]["mean"], methods[reference]["accuracy_se"][key]
                b, se_b = methods[label]["accuracy"][key]["mean"], methods[label]["accuracy_se"][key]
            else:
                continue
            bound = 2 * math.sqrt(se_a ** 2 + se_b ** 2)
            if abs(b - a) > bound:
                found.append({"variant": label, "reference": reference, "tier": key, "difference": b - a,
                              "two_se": bound})
    return found


def task_baselines(runs: dict[str, list[RunResults]]) -> dict[str, dict[str, float]] | None:
    """Per task: its chance level, majority baseline and question count (causal-lm), from the first run."""
    first = next(iter(runs.values()))[0]
    details = next(iter((first.final.tier_details or {}).values()), None)
    if details is None:
        return None
    tasks = sorted({key.rsplit("/", 1)[0] for key in details if key.endswith("/chance")})
    return {t: {"chance": details[f"{t}/chance"], "majority": details.get(f"{t}/majority", float("nan")),
                "questions": details.get(f"{t}/questions", float("nan")),
                "generated": details.get(f"{t}/generated", float("nan"))} for t in tasks}


def uncertainty_tables(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """The report's tables of errors, arrival, protocols and baselines."""
    methods, tables = summary["methods"], []
    tiers = sorted({t for e in methods.values() for t in e["tiers"]}, key=float)
    cell = lambda v, se: f"{v:.3f} ± {se:.3f}"  # noqa: E731
    rows = [[m, *(cell(e["accuracy"][t]["mean"], e["accuracy_se"][t]) if t in e["accuracy"] else "–" for t in tiers),
             cell(e["average"]["mean"], e["average_se"])] for m, e in methods.items()]
    tables.append(("Accuracy per tier ± its standard error over the test questions",
                   ["method", *(f"β={t}" for t in tiers), "average"], rows))
    protocol_rows = [[m, f"β={t}", cell(p["loglik"]["value"], p["loglik"]["se"]),
                      cell(p["generation"]["value"], p["generation"]["se"]), f"{p['format']['value']:.2f}",
                      f"{p['loss']:.3f}"]
                     for m, e in methods.items() for t, p in e.get("protocols", {}).items()
                     if {"loglik", "generation", "format"} <= set(p)]
    if protocol_rows:
        tables.append(("Per tier: log-likelihood and generation accuracy ± SE, format rate (share of generations "
                       "naming an answer), test loss", ["method", "tier", "loglik", "generation", "format", "loss"],
                       protocol_rows))
    baselines = summary.get("task_baselines")
    if baselines:
        tables.append(("What an accuracy must beat, per task (test questions scored / generated)",
                       ["task", "chance", "majority answer", "questions"],
                       [[t, f"{b['chance']:.3f}", f"{b['majority']:.3f}", f"{b['questions']:.0f} / {b['generated']:.0f}"]
                        for t, b in baselines.items()]))
    arrival = [[m, f"β={t}", f"{a['before']:.3f}", f"{a['last']:.3f}", f"{a['se']:.3f}",
                {True: "yes", False: "no: last rounds differ by more than one SE", None: "unknown (no SE)"}[a["arrived"]]]
               for m, e in methods.items() for t, a in e.get("arrived", {}).items()]
    if arrival:
        tables.append(("Arrived? The last two rounds' accuracy against one standard error",
                       ["method", "tier", "round before last", "last round", "SE", "arrived"], arrival))
    if len(methods) > 1:
        reference = next(iter(methods))
        found = summary.get("beyond_two_se", [])
        tables.append((f"Differences from {reference} beyond two standard errors" + ("" if found else ": none"),
                       ["variant", "tier", "difference", "2 SE"],
                       [[d["variant"], d["tier"] if d["tier"] == "average" else f"β={d['tier']}",
                         f"{d['difference']:+.3f}", f"{d['two_se']:.3f}"] for d in found]))
    return tables
