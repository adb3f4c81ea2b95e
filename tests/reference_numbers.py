"""The numbers of a tiny two-round run of every registered method on both tiny backbones, kept in
``tests/data/reference_numbers.json`` so that a change meant to keep every number (a refactoring)
can prove it did. A change that means to move numbers rewrites the file and says why:

    .venv/bin/python tests/reference_numbers.py --write
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny_checkpoints import write_tiny_bert, write_tiny_llama  # noqa: E402
from tiny_experiment import tiny_overrides, write_tiny_task  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "reference_numbers.json"


def run_numbers(backbones: dict[str, Path], task: Path) -> dict[str, list[dict]]:
    """Per "backbone/method", per round: tier accuracies and losses, the clients' train losses and FLOPs,
    each tier's inference FLOPs per token (dropout on, one thread)."""
    from ubsmoe.config import load_config
    from ubsmoe.engine.rounds import run_experiment
    from ubsmoe.methods import REGISTRY

    numbers = {}
    for name, backbone in backbones.items():
        for method in sorted(REGISTRY):
            overrides = tiny_overrides(backbone, task, **{"model.dropout": 0.1, "threads": 1})
            results = run_experiment(load_config(overrides=overrides, method=method), show_progress=False)
            numbers[f"{name}/{method}"] = [{
                "tier_accuracy": h.tier_accuracy, "tier_loss": h.tier_loss,
                "train_loss": [c.train_loss for c in h.clients],
                "train_flops": [c.train_flops for c in h.cost.clients],
                "inference_flops": {t: v.inference_flops_per_token for t, v in h.cost.tiers.items()},
            } for h in results.history]
    return numbers


def tiny_setup(folder: Path) -> tuple[dict[str, Path], Path]:
    return ({"bert": write_tiny_bert(folder / "bert"), "llama": write_tiny_llama(folder / "llama")},
            write_tiny_task(folder))


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as scratch:
        REFERENCE.parent.mkdir(exist_ok=True)
        REFERENCE.write_text(json.dumps(run_numbers(*tiny_setup(Path(scratch))), indent=1) + "\n")
    print(f"wrote {REFERENCE}")
