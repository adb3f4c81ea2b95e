"""Interleaved timing: candidates run in turn, round after round, so machine noise hits all alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_times(candidates: dict[str, Callable[[], float | None]], repeats: int, warmup: int = 2,
                      progress: str | None = None) -> dict[str, list[float]]:
    """Run every candidate once per round, ``warmup + repeats`` rounds; seconds per candidate and round.

    A candidate that returns a number has timed itself (the part of its work that counts); otherwise
    the whole call is timed. Entry i of every list comes from the same round. ``progress``: the label
    of a progress bar over the rounds (on standard error); None shows none.
    """
    from tqdm.auto import tqdm

    times: dict[str, list[float]] = {name: [] for name in candidates}
    for round_index in tqdm(range(warmup + repeats), desc=progress, unit="round", disable=progress is None):
        for name, fn in candidates.items():
            start = time.perf_counter()
            own = fn()
            elapsed = time.perf_counter() - start if own is None else own
            if round_index >= warmup:
                times[name].append(elapsed)
    return times


def interleaved_medians(candidates: dict[str, Callable[[], float | None]], repeats: int, warmup: int = 2
                        ) -> dict[str, float]:
    """The median of ``interleaved_times`` per candidate."""
    return {name: statistics.median(values) for name, values in interleaved_times(candidates, repeats, warmup).items()}
