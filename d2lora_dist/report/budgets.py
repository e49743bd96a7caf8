"""Budgets in the report: what optimisation each arm got, and which Δ compares arms that got unequal ones.

Every finished cell's result.json records its budget (d2lora_dist/budget.py): optimizer steps,
summed learning rate and trained tokens of its own phase and, for a warm-started cell, of its
warm-up. A table shows each arm's budget per n; a Δ whose arms differ in total budget (phase +
warm-up) by more than `report.budget_ratio`, in steps or in summed learning rate, carries MARK and
a line under its table says which budget differs and by how much.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import mean
from typing import Any

from d2lora_dist.budget import Budget
from d2lora_dist.errors import InputError

MARK = "‡"


@dataclass(frozen=True)
class CellBudget:
    phase: Budget
    warmup: Budget | None  # None: a fresh start

    @property
    def total(self) -> Budget:
        return self.phase if self.warmup is None else self.phase.plus(self.warmup)

    def to_json(self) -> dict[str, Any]:
        return {"phase": self.phase.to_dict(), "warmup": None if self.warmup is None else self.warmup.to_dict()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CellBudget:
        """The inverse of to_json (also reads result.json's `budget`); KeyError/TypeError/ValueError when malformed."""
        return cls(Budget.from_dict(data["phase"]), None if data["warmup"] is None else Budget.from_dict(data["warmup"]))


def read_budget(data: dict[str, Any], path: Any) -> CellBudget | None:
    """A result.json's budget (None for a result from before budgets); InputError naming the file if malformed."""
    if data.get("budget") is None:
        return None
    try:
        return CellBudget.from_json(data["budget"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{path}: `budget` is not a budget record (phase and warmup, each with steps, lr_sum "
                         f"and tokens): {type(e).__name__}: {e}; delete the file to re-run the cell") from e


def _span(values: list[float], fmt: str) -> str:
    low, high = min(values), max(values)
    return format(low, fmt) if low == high else f"{format(low, fmt)}–{format(high, fmt)}"


def _part(budgets: list[Budget]) -> tuple[str, str, str]:
    lr = [b.lr_sum for b in budgets]
    return (_span([b.steps for b in budgets], "d"), "?" if None in lr else _span(lr, ".3g"),
            _span([b.tokens for b in budgets], ",d"))


def describe(budgets: list[CellBudget]) -> str:
    """'6 steps · ΣLR 0.003 · 1.2k tokens', with the warm-up's beside it: '6 + 4 warm-up steps · …';
    a range over seeds where they differ; '?' where a result from before budgets lacks the summed rate."""
    if not budgets:
        return "—"
    steps, lr, tokens = _part([b.phase for b in budgets])
    warmups = [b.warmup for b in budgets if b.warmup is not None]
    if not warmups:
        return f"{steps} steps · ΣLR {lr} · {tokens} tokens"
    w_steps, w_lr, w_tokens = _part(warmups)
    return f"{steps} + {w_steps} warm-up steps · ΣLR {lr} + {w_lr} · {tokens} + {w_tokens} tokens"


def _ratio(a: float, b: float) -> float:
    low, high = sorted((a, b))
    return 1.0 if high == 0 else float("inf") if low == 0 else high / low


def unequal(baseline: list[CellBudget], treatment: list[CellBudget], ratio: float) -> str | None:
    """Which total budget differs by more than `ratio` between the arms (means over their seeds), and by how
    much; None when neither does or an arm has no recorded budget."""
    if not baseline or not treatment:
        return None
    parts = []
    steps = [mean(b.total.steps for b in arm) for arm in (treatment, baseline)]
    if _ratio(*steps) > ratio:
        parts.append(f"optimizer steps {steps[0]:g} vs {steps[1]:g} (×{_ratio(*steps):.2f})")
    lrs = [[b.total.lr_sum for b in arm] for arm in (treatment, baseline)]
    if all(None not in arm for arm in lrs):
        lr = [mean(arm) for arm in lrs]
        if _ratio(*lr) > ratio:
            parts.append(f"summed learning rate {lr[0]:.3g} vs {lr[1]:.3g} (×{_ratio(*lr):.2f})")
    return "; ".join(parts) or None
