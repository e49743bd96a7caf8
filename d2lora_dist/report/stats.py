"""Seed statistics: mean ± sample std, and a bootstrap CI of the D2LoRA − LoRA difference.

The bootstrap (documented so a reader can recompute it):
  rng = numpy.random.default_rng(BOOTSTRAP_SEED)            # a fresh generator per interval
  i = rng.integers(0, len(d2lora), size=(RESAMPLES, len(d2lora)))
  j = rng.integers(0, len(lora), size=(RESAMPLES, len(lora)))
  diffs = d2lora[i].mean(axis=1) - lora[j].mean(axis=1)     # seeds resampled within each init
  ci = numpy.percentile(diffs, [2.5, 97.5])                  # percentile interval, 95%
It needs at least two seeds on each side; with one seed there is no interval to report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_SEED = 20240611
RESAMPLES = 10_000
LEVEL = 0.95


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for a single value."""
    if not values:
        raise ValueError("mean_std of no values")
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def bootstrap_diff_ci(d2lora: Sequence[float], lora: Sequence[float], *, resamples: int = RESAMPLES,
                      seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> tuple[float, float] | None:
    """Percentile bootstrap CI of mean(d2lora) − mean(lora); None unless both have >= 2 seeds."""
    if len(d2lora) < 2 or len(lora) < 2:
        return None
    a, b = np.asarray(d2lora, dtype=float), np.asarray(lora, dtype=float)
    rng = np.random.default_rng(seed)
    i = rng.integers(0, a.size, size=(resamples, a.size))
    j = rng.integers(0, b.size, size=(resamples, b.size))
    diffs = a[i].mean(axis=1) - b[j].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return float(lo), float(hi)
