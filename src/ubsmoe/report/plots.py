"""The comparison report's figures (matplotlib, written as PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def make_plots(summary: dict, folder: Path) -> list[tuple[str, Path]]:
    """Every figure of the report: [(title, png path)]."""
    folder.mkdir(parents=True, exist_ok=True)
    methods = summary["methods"]
    figures = [
        ("Accuracy per round, per tier", accuracy_per_round(methods)),
        ("Final accuracy per tier, by method", accuracy_by_method(methods)),
    ]
    if any("cost" in e for e in methods.values()):
        figures.append(("Accuracy against training compute, per tier", accuracy_vs_compute(methods)))
    for method, entry in methods.items():
        if "expert_load" in entry:
            figures.append((f"Expert load per tier on the test set: {method}", load_heatmaps(method, entry)))
    written = []
    for index, (title, figure) in enumerate(figures):
        path = folder / f"{index:02d}-{_slug(title)}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append((title, path))
    return written


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]


def accuracy_per_round(methods: dict):
    n = len(methods)
    cols = min(n, 3)
    rows = -(-n // cols)
    figure, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False, sharey=True)
    for ax, (method, entry) in zip(axes.flat, methods.items()):
        for tier, values in entry["accuracy_per_round"].items():
            ax.plot(range(1, len(values) + 1), values, marker="o", label=f"β={tier}")
        ax.set_title(method)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.tight_layout()
    # one legend for every panel, above them, where it hides no line (the saved figure's bounds include it)
    figure.legend(handles, labels, fontsize=8, ncol=len(labels), loc="lower center", bbox_to_anchor=(0.5, 1.0),
                  frameon=False)
    return figure


def accuracy_by_method(methods: dict):
    tiers = sorted({t for e in methods.values() for t in e["tiers"]}, key=float)
    missing = {"mean": float("nan"), "std": 0.0}
    figure, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) * len(tiers) / 2), 3.6))
    width = 0.8 / len(tiers)
    for i, tier in enumerate(tiers):
        xs = [j + (i - (len(tiers) - 1) / 2) * width for j in range(len(methods))]
        means = [e["accuracy"].get(tier, missing)["mean"] for e in methods.values()]
        stds = [e["accuracy"].get(tier, missing)["std"] for e in methods.values()]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"β={tier}")
    ax.set_xticks(range(len(methods)), list(methods), rotation=20)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8, ncol=len(tiers), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # above the bars
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


TIER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def accuracy_vs_compute(methods: dict):
    """One line per method through its tiers (colour: method; marker: tier), training compute on x."""
    figure, ax = plt.subplots(figsize=(7.2, 4.2))
    tiers_seen: list[str] = []
    method_handles = []
    for method, entry in methods.items():
        if "cost" not in entry:
            continue
        points = [(entry["cost"][t]["train_flops_per_token"] / 1e6, entry["accuracy"][t]["mean"], t)
                  for t in entry["tiers"] if "train_flops_per_token" in entry["cost"].get(t, {})]
        if not points:
            continue
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], alpha=0.8)
        method_handles.append(Line2D([], [], color=line.get_color(), label=method))
        for x, y, tier in points:
            if tier not in tiers_seen:
                tiers_seen.append(tier)
            marker = TIER_MARKERS[tiers_seen.index(tier) % len(TIER_MARKERS)]
            ax.plot([x], [y], marker=marker, color=line.get_color(), markersize=7, linestyle="none")
    ax.set_xlabel("training MFLOPs per token")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    tier_handles = [Line2D([], [], marker=TIER_MARKERS[i % len(TIER_MARKERS)], color="0.35", linestyle="none",
                           label=f"β={tier}") for i, tier in enumerate(tiers_seen)]
    if method_handles:  # both legends outside the axes, on the right, so that they never hide a point
        methods_legend = ax.legend(handles=method_handles, fontsize=8, title="method", title_fontsize=8,
                                   loc="upper left", bbox_to_anchor=(1.02, 1.0))
        ax.add_artist(methods_legend)
        ax.legend(handles=tier_handles, fontsize=8, title="tier", title_fontsize=8, loc="lower left",
                  bbox_to_anchor=(1.02, 0.0))
    figure.tight_layout()
    return figure


def load_heatmaps(method: str, entry: dict):
    tiers = entry["tiers"]
    figure, axes = plt.subplots(1, len(tiers), figsize=(3.2 * len(tiers), 2.8), squeeze=False)
    for ax, tier in zip(axes[0], tiers):
        image = ax.imshow(entry["expert_load"][tier], aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"{method}, β={tier}", fontsize=9)
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("layer")
    figure.colorbar(image, ax=axes[0].tolist(), label="share of tokens routed")
    return figure
