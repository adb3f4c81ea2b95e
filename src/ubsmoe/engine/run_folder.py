"""A run's folder (``--out``): checked before the run, and at its end the results (results.json) and their
markdown summary (summary.md); the checkpoint, history and saved model beside them are written by the
server (``engine.server``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ubsmoe.config import ConfigError, MissingFileError
from ubsmoe.engine.checkpoint import CHECKPOINT
from ubsmoe.engine.run_records import RunCost, RunResults
from ubsmoe.storage import DamagedFileError, write_atomically

RESULTS = "results.json"


def check_output_folder(out_dir: Path, force: bool = False) -> None:
    """Before any work: ``out_dir`` must be a folder ubsmoe can write, and must not hold a finished run
    unless ``force`` (``ConfigError`` otherwise, naming the fix)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder: choose another --out")
    if (out_dir / "results.json").is_file() and not force:
        raise ConfigError(f"{out_dir} holds a finished run (results.json): choose another --out, or pass --force "
                          "to replace it")
    if (out_dir / CHECKPOINT).is_file() and not force:
        raise ConfigError(f"{out_dir} holds an unfinished run ({CHECKPOINT}): continue it with --resume {out_dir}, "
                          "or pass --force to start over")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".ubsmoe-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"cannot write into --out {out_dir} ({error.strerror}): choose a folder you can write") from None
    if force:  # the run replaced: nothing of it may be resumed, reported or loaded any more
        for name in ("results.json", "summary.md", "history.json", CHECKPOINT):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / "model", ignore_errors=True)


def write_results(results: RunResults, out_dir: Path) -> None:
    """results.json and summary.md, each written whole or not at all (temporary file, fsync, rename), so
    that a results file that exists is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(out_dir / "summary.md", summary_markdown(results))
    write_atomically(out_dir / RESULTS, json.dumps(results.to_json(), indent=2))


def read_results(out_dir: Path) -> RunResults:
    """The results of the finished run in ``out_dir``."""
    path = out_dir / RESULTS
    if not path.is_file():
        raise MissingFileError(f"{out_dir} holds no finished run ({RESULTS}): give the --out folder of a finished run")
    try:
        return RunResults.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        raise DamagedFileError(f"{path} is unreadable ({type(error).__name__}: {error}): delete it, or run the "
                               "experiment again") from None


def tier_table(results: RunResults) -> str:
    """The final per-tier accuracy as a markdown table (one row)."""
    final = results.final
    tiers = list(final.tier_accuracy)
    header = "| method | " + " | ".join(f"beta={t}" for t in tiers) + " | average |"
    rule = "|---" * (len(tiers) + 2) + "|"
    row = (f"| {results.method} | " + " | ".join(f"{final.tier_accuracy[t]:.4f}" for t in tiers)
           + f" | {final.average_accuracy:.4f} |")
    return "\n".join([header, rule, row])


def shared_note(results: RunResults) -> str:
    """", S = 1 shared" where the run's upcycled layers have shared experts (K counts them), else ""."""
    return f", S = {results.shared_experts} shared" if results.shared_experts else ""


def summary_markdown(results: RunResults) -> str:
    config, final = results.config, results.final
    lines = [
        f"# {results.method} on {config['data']['dataset']}",
        "",
        f"Backbone {config['model']['backbone']}, M={config['model']['num_experts']} experts "
        f"(K_max={results.k_max}{shared_note(results)}), LoRA r={config['model']['lora_rank']}; "
        f"{config['federation']['num_clients']} clients, {config['federation']['rounds']} rounds, "
        f"{config['federation']['partition']} split; {results.num_train} train / {results.num_test} test "
        f"samples; {results.runtime_s:.0f} s.",
        "",
        "## Final accuracy per budget tier",
        "",
        tier_table(results),
        "",
        "## Accuracy per round",
        "",
        "| round | " + " | ".join(f"beta={t}" for t in final.tier_accuracy) + " | average | test loss |",
        "|---" * (len(final.tier_accuracy) + 3) + "|",
    ]
    for record in results.history:
        lines.append(f"| {record.round} | " + " | ".join(f"{a:.4f}" for a in record.tier_accuracy.values())
                     + f" | {record.average_accuracy:.4f} | {record.test_loss:.4f} |")
    lines += ["", *cost_table(results.cost)]
    lines += ["", "Trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in results.parameters.items()), ""]
    return "\n".join(lines)


def human(value: float, unit: str = "") -> str:
    """1.23 G, 456 k, ...: three significant digits with a metric prefix."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def cost_table(cost: RunCost) -> list[str]:
    """Markdown lines: compute, time and communication per tier, the low tier's reductions, peak memory."""
    lines = [
        "## Cost per budget tier",
        "",
        "Per client and round, averaged over rounds; FLOPs are matmul FLOPs counted from the actual routing.",
        "",
        "| tier | train FLOPs | train FLOPs / token | inference FLOPs / token | median step | download | upload |",
        "|---|---|---|---|---|---|---|",
    ]
    for tier, c in cost.tiers.items():
        if not c.trained:
            lines.append(f"| beta={tier} | - | - | {human(c.inference_flops_per_token)} | - | - | - |")
            continue
        lines.append(f"| beta={tier} | {human(c.train_flops)} | {human(c.train_flops_per_token)} "
                     f"| {human(c.inference_flops_per_token)} | {c.step_seconds_median * 1e3:.0f} ms "
                     f"| {human(c.download_bytes, 'B')} | {human(c.upload_bytes, 'B')} |")
    if cost.low_tier_reduction:
        lines += ["", "Low tier against top tier: " + ", ".join(
            f"{name.replace('_', ' ')} {value:.0%} less" for name, value in cost.low_tier_reduction.items()) + "."]
    lines += ["", f"Peak resident memory: {cost.peak_rss_mb:.0f} MiB."]
    return lines
