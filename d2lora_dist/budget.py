"""A phase's optimisation budget: optimizer steps, summed learning rate and trained tokens.

Two arms compare fairly only when the optimisation they got is in the open: a D2LoRA cell has the
warm-up's steps on top of its own, at the same peak rate. The summed learning rate is Σ_k lr_k over
the optimizer steps that ran, read from the scheduler that set them (the peak times its multiplier at
each step), so a warm-up ratio, a cosine decay or steps raised to `min_steps` count as they ran. A
cell's budget is its phase's plus, for a warm-started cell, its warm-up's (read from the warm-up's
result.json), kept apart and summed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Budget:
    steps: int  # optimizer steps taken
    lr_sum: float | None  # Σ learning rate over those steps; None = not recorded (results from before budgets)
    tokens: int  # non-padding input tokens the phase trained on

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Budget:
        lr_sum = data["lr_sum"]
        return cls(int(data["steps"]), None if lr_sum is None else float(lr_sum), int(data["tokens"]))

    def plus(self, other: Budget) -> Budget:
        lr_sum = None if self.lr_sum is None or other.lr_sum is None else self.lr_sum + other.lr_sum
        return Budget(self.steps + other.steps, lr_sum, self.tokens + other.tokens)


NOTHING = Budget(0, 0.0, 0)  # a cell that trains nothing (n = 0)


def summed_learning_rate(scheduler: Any, steps: int) -> float | None:
    """Σ_{k < steps} of the rate the scheduler set for step k: peak × its multiplier at k (the rate the
    Trainer logs for that step). The wrappers of accelerate and DeepSpeed hold the scheduler as
    `.scheduler`; a scheduler without per-step multipliers (ReduceLROnPlateau) gives None."""
    inner = scheduler
    while not hasattr(inner, "lr_lambdas") and hasattr(inner, "scheduler"):
        inner = inner.scheduler
    if not hasattr(inner, "lr_lambdas"):
        return None
    peak, multiplier = inner.base_lrs[0], inner.lr_lambdas[0]
    return float(sum(peak * multiplier(k) for k in range(steps)))


def phase_budget_of(manifest: dict[str, Any]) -> Budget:
    """A trained adapter's budget from its manifest; an adapter saved before budgets has its steps and
    tokens recorded, not its summed rate."""
    if manifest.get("budget") is not None:
        return Budget.from_dict(manifest["budget"])
    return Budget(int(manifest["schedule"]["optimizer_steps"]), None, int(manifest.get("tokens_seen") or 0))


def warmup_budget_of(result: dict[str, Any]) -> Budget:
    """A warm-up's budget from its result.json (one from before budgets: its steps and tokens)."""
    if result.get("budget") is not None:
        return Budget.from_dict(result["budget"])
    train = result["train"]
    return Budget(int(train["steps"]), None, int(train.get("tokens_seen") or 0))


def cell_budget(phase: Budget, warmup: Budget | None) -> dict[str, Any]:
    """The record a cell's result.json carries: its phase, its warm-up's (None for a fresh start), the total."""
    total = phase if warmup is None else phase.plus(warmup)
    return {"phase": phase.to_dict(), "warmup": None if warmup is None else warmup.to_dict(),
            "total": total.to_dict()}
