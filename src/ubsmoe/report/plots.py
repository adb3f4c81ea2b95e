"""The comparison report's figures (matplotlib, written as PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    figure.tight_layout()
    return figure


def accuracy_by_method(methods: dict):
    tiers = next(iter(methods.values()))["tiers"]
    figure, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods) * len(tiers) / 2), 3.6))
    width = 0.8 / len(tiers)
    for i, tier in enumerate(tiers):
        xs = [j + (i - (len(tiers) - 1) / 2) * width for j in range(len(methods))]
        means = [e["accuracy"][tier]["mean"] for e in methods.values()]
        stds = [e["accuracy"][tier]["std"] for e in methods.values()]
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=f"β={tier}")
    ax.set_xticks(range(len(methods)), list(methods), rotation=20)
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8, ncol=len(tiers))
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def accuracy_vs_compute(methods: dict):
    figure, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, entry in methods.items():
        if "cost" not in entry:
            continue
        xs, ys = [], []
        for tier in entry["tiers"]:
            cost = entry["cost"][tier]
            if "train_flops_per_token" in cost:
                xs.append(cost["train_flops_per_token"])
                ys.append(entry["accuracy"][tier]["mean"])
        ax.plot(xs, ys, marker="o", label=method)
        for x, y, tier in zip(xs, ys, entry["tiers"]):
            ax.annotate(f"β={tier}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("training FLOPs per token")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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
