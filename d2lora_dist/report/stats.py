"""Statistics of the report: mean ± sample std over seeds, and the paired hierarchical bootstrap
interval of Δ = D2LoRA − LoRA (docs/statistics.md explains the choices).

Input: for each of the S paired seeds s (ascending seed order), the vector d_s of per-item
differences (D2LoRA item score − LoRA item score, over the m_s items both arms answered).
Δ = mean over s of mean(d_s). The interval, step by step, so a reader can recompute it:

  rng = numpy.random.default_rng(BOOTSTRAP_SEED)          # a fresh generator per interval
  picks = rng.integers(0, S, size=(RESAMPLES, S))          # seeds drawn with replacement
  means = empty((RESAMPLES, S))                            # one item-resampled mean per pick
  for s in range(S):
      at = flatnonzero(picks == s)                         # row-major positions of seed s
      u, c = unique(d_s, return_counts=True)
      if len(u) <= MULTINOMIAL_MAX_VALUES:                 # e.g. accuracy: d in {-1, 0, 1}
          counts = rng.multinomial(m_s, c / m_s, size=len(at))
          means.flat[at] = counts @ u / m_s
      else:                                                # e.g. ROUGE: continuous differences
          for block in blocks of at, max(1, BLOCK_DRAWS // m_s) positions each, in order:
              idx = rng.integers(0, m_s, size=(len(block), m_s), dtype=numpy.int32)
              means.flat[block] = d_s[idx].sum(axis=1) / m_s
  values = means.mean(axis=1)
  ci = numpy.percentile(values, [2.5, 97.5])               # percentile interval, level 95%

Both branches draw m_s items with replacement (the multinomial draws how often each distinct
difference is drawn: the same distribution, in time independent of m_s). Resampling d_s is
resampling both arms with the same item draws: the bootstrap is paired.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BOOTSTRAP_SEED = 20240611
RESAMPLES = 10_000
LEVEL = 0.95
MULTINOMIAL_MAX_VALUES = 16  # distinct per-item differences up to which counts are drawn at once
BLOCK_DRAWS = 1 << 22  # item indices drawn per call otherwise (16 MiB of int32)


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1); std is None for a single value."""
    if not values:
        raise ValueError("mean_std of no values")
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None)


def paired_delta(diffs: Sequence[Sequence[float]]) -> float:
    """Δ: the mean over seeds of each seed's mean item difference."""
    _check(diffs)
    return float(np.mean([np.mean(np.asarray(d, dtype=float)) for d in diffs]))


def paired_bootstrap_ci(diffs: Sequence[Sequence[float]], *, resamples: int = RESAMPLES,
                        seed: int = BOOTSTRAP_SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of Δ by the paired hierarchical bootstrap in the module docstring.

    `diffs[s]` are seed s's per-item differences. One seed gives the item-level (test-set)
    interval; seeds given one value each (a seed-level difference) give the seed bootstrap.
    """
    _check(diffs)
    arrays = [np.asarray(d, dtype=float) for d in diffs]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(arrays), size=(resamples, len(arrays)))
    means = np.empty(picks.shape)
    for s, d in enumerate(arrays):
        means.flat[np.flatnonzero(picks == s)] = _item_means(rng, d, int((picks == s).sum()))
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means.mean(axis=1), [tail, 100 - tail])
    return float(lo), float(hi)


def _item_means(rng: np.random.Generator, d: np.ndarray, draws: int) -> np.ndarray:
    """`draws` means of d.size items drawn with replacement from d."""
    m = d.size
    values, counts = np.unique(d, return_counts=True)
    if values.size <= MULTINOMIAL_MAX_VALUES:
        return rng.multinomial(m, counts / m, size=draws) @ values / m
    out = np.empty(draws)
    rows = max(1, BLOCK_DRAWS // m)
    for start in range(0, draws, rows):
        n = min(rows, draws - start)
        out[start:start + n] = d[rng.integers(0, m, size=(n, m), dtype=np.int32)].sum(axis=1) / m
    return out


def excludes_zero(ci: tuple[float, float] | None) -> bool:
    """Resolved: the interval lies strictly on one side of 0 (touching 0 is not enough)."""
    return ci is not None and (ci[0] > 0.0 or ci[1] < 0.0)


def _check(diffs: Sequence[Sequence[float]]) -> None:
    if not diffs or any(len(d) == 0 for d in diffs):
        raise ValueError("paired statistics need at least one seed with at least one item difference")
