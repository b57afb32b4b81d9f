"""Timing helpers shared by the benchmarks: best-of-N, alternating with the reference.

Figures are printed beside a reference measured in the same run on the same machine,
because absolute microseconds mean little across machines; the ratio is the target.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """Fastest of ``repeat`` runs in seconds: the least disturbed by the rest of the box."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def alternate(a: Callable[[], object], b: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median seconds of ``a`` and ``b`` measured turn about, so drift hits both alike."""
    times_a, times_b = [], []
    for _ in range(repeat):
        times_a.append(best_of(a, 1))
        times_b.append(best_of(b, 1))
    return statistics.median(times_a), statistics.median(times_b)


def report(
    label: str, value: float, unit: str, reference: str, verdict: bool | None, digits: int = 1
) -> bool:
    """Print one figure beside its reference; ``verdict`` None marks a figure without a
    target (``info``), which never fails the run."""
    mark = "info" if verdict is None else "ok  " if verdict else "FAIL"
    print(f"  [{mark}] {label:<44} {value:>10.{digits}f} {unit:<6} {reference}")
    return verdict is not False


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by the nearest-rank method: a value that occurred."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]
