"""Which Δ the report calls resolved, and what it calls the rest (docs/statistics.md).

- A trained Δ (n > 0) on fewer paired seeds than `report.min_seeds` shows its interval and is
  "too few seeds to resolve (k of min_seeds)", never resolved. The n = 0 Δ (nothing trained,
  greedy decoding: one run per arm) is the exception: its interval is test-set noise only.
- A primary comparison (`report.primary`) is resolved when its two-sided p < 1 − LEVEL: the 95 %
  t interval excludes 0.
- Every other Δ is exploratory: resolved only when its Holm-adjusted p < 1 − LEVEL, Holm over the
  exploratory Δs of its table (task, method, suite: every metric, pair and n with a verdict).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from d2lora_dist.config import SINGLE_WARMUP, Experiment, ReportConfig, primary_warmups
from d2lora_dist.inits import BASELINE, TREATMENT
from d2lora_dist.report.stats import LEVEL, holm
from d2lora_dist.sweep.grid import NO_TRAINING, arm_name

PRIMARY, EXPLORATORY = "primary", "exploratory"
RESOLVED, UNRESOLVED, TOO_FEW, NO_INTERVAL = "resolved", "unresolved", "too few seeds", "no interval"


@dataclass(frozen=True)
class Verdict:
    state: str  # RESOLVED | UNRESOLVED | TOO_FEW | NO_INTERVAL
    role: str  # PRIMARY | EXPLORATORY
    seeds: int
    min_seeds: int
    p_holm: float | None = None  # exploratory: the Holm-adjusted p
    family: int = 0  # exploratory: how many Δs Holm adjusted over

    @property
    def resolved(self) -> bool:
        return self.state == RESOLVED

    @property
    def label(self) -> str:
        """The words a table cell ends with."""
        if self.state == TOO_FEW:
            return f"too few seeds to resolve ({self.seeds} of {self.min_seeds})"
        if self.state == NO_INTERVAL:
            return "no interval"
        if self.role == PRIMARY:
            return f"{self.state} (primary)"
        return f"{self.state} (exploratory, Holm-adjusted p {self.p_holm:.3f} over {self.family} Δ)"

    @property
    def short(self) -> str:
        """The words a plot writes next to a point."""
        if self.state in (TOO_FEW, NO_INTERVAL):
            return self.state
        return self.state if self.role == PRIMARY else f"{self.state} (Holm)"


def enough_seeds(seeds: int, n: int, min_seeds: int) -> bool:
    """A Δ may be judged: enough paired seeds, or the n = 0 comparison (test-set noise only)."""
    return n == 0 or seeds >= min_seeds


def primary_resolved(p: np.ndarray | float, seeds: int, n: int, min_seeds: int, level: float = LEVEL) -> np.ndarray:
    """The label of a primary comparison, vectorised over simulated studies: enough seeds and p < 1 − level."""
    return np.asarray(enough_seeds(seeds, n, min_seeds) & (np.asarray(p, float) < 1.0 - level))


def exploratory_resolved(p: Sequence[float], level: float = LEVEL) -> tuple[list[bool], list[float]]:
    """Holm over one family of exploratory Δs: (resolved, adjusted p) for each, in the order given."""
    adjusted = holm(p)
    return [a < 1.0 - level for a in adjusted], adjusted


def primary_keys(exp: Experiment) -> frozenset[tuple]:
    """The Δ keys (report.paired.Delta.key) of `report.primary`, as validated by config."""
    keys = set()
    for p in exp.report.primary:
        task = exp.tasks[p.task]
        suite = p.suite or task.suites[0]
        method = NO_TRAINING if p.n == 0 else p.method
        named = p.warmup or next(iter(primary_warmups(exp, p)), SINGLE_WARMUP)
        keys.add((p.task, method, p.n, suite, p.metric, arm_name(TREATMENT, named, p.lora_init),
                  arm_name(BASELINE, "", p.lora_init)))
    return frozenset(keys)


@dataclass(frozen=True)
class Judging:
    """What the report needs to judge Δs, from an experiment's `report` section or from the settings row
    of an items.csv: report.min_seeds, the primary comparisons as Δ keys, report.target_effect,
    report.budget_ratio."""

    min_seeds: int
    primary: frozenset[tuple]
    target_effect: dict[str, float]
    budget_ratio: float = ReportConfig.budget_ratio  # an items.csv from before budgets records none (and no budgets)

    def to_json(self) -> dict:
        return {"min_seeds": self.min_seeds, "primary": sorted(list(k) for k in self.primary),
                "target_effect": dict(self.target_effect), "budget_ratio": self.budget_ratio}

    @classmethod
    def from_json(cls, data: dict) -> Judging:
        """The inverse of to_json; KeyError/TypeError/ValueError on a malformed record (the caller names the line)."""
        keys = frozenset((t, m, int(n), s, metric, treat, base) for t, m, n, s, metric, treat, base in data["primary"])
        ratio = float(data["budget_ratio"]) if "budget_ratio" in data else ReportConfig.budget_ratio
        return cls(int(data["min_seeds"]), keys, {str(k): float(v) for k, v in data["target_effect"].items()}, ratio)


def judging_of(exp: Experiment) -> Judging:
    return Judging(exp.report.min_seeds, primary_keys(exp), dict(exp.report.target_effect), exp.report.budget_ratio)
