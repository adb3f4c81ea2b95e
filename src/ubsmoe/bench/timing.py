"""Interleaved timing: candidates run in turn, round after round, so machine noise hits all alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(candidates: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Run every candidate once per round, ``warmup + repeats`` rounds; median seconds per candidate."""
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in range(warmup + repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_index >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}
