"""The settings a grid block's `tune` tries: the product of its axes, each with a label for cell ids.

A label names only the axes the block tunes (`lr2e-4`, `lr1e-4-st16`, `ep3`), so selection cells
read `titles-sft-lora-n16-tune-lr2e-4-s0`. Settings order as the selection rule breaks ties:
smaller learning rate first, then fewer steps (min_steps, then epochs).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np

from d2lora_dist.config import TrainSettings, TuneConfig
from d2lora_dist.errors import UnknownName


@dataclass(frozen=True)
class TuneSetting:
    """One point of the axes; None = the method's own value."""

    learning_rate: float | None = None
    epochs: float | None = None
    min_steps: int | None = None

    @property
    def label(self) -> str:
        parts = []
        if self.learning_rate is not None:
            parts.append("lr" + np.format_float_scientific(self.learning_rate, trim="-", exp_digits=1))
        if self.epochs is not None:
            parts.append(f"ep{self.epochs:g}")
        if self.min_steps is not None:
            parts.append(f"st{self.min_steps}")
        return "-".join(parts)

    def applied(self, settings: TrainSettings) -> TrainSettings:
        """The method's settings with this point's values."""
        values = {k: v for k, v in (("learning_rate", self.learning_rate), ("epochs", self.epochs),
                                    ("min_steps", self.min_steps)) if v is not None}
        return replace(settings, **values)

    def to_dict(self) -> dict:
        return {"label": self.label, "learning_rate": self.learning_rate, "epochs": self.epochs,
                "min_steps": self.min_steps}


def tie_order(setting: TuneSetting, base: TrainSettings) -> tuple[float, int, float]:
    """Among equal validation scores the cheaper setting wins: smaller learning rate, then fewer steps."""
    applied = setting.applied(base)
    return (applied.learning_rate, applied.min_steps, applied.epochs)


def tune_settings(tune: TuneConfig) -> list[TuneSetting]:
    """Every point of the block's axes, in the order of the axes' lists."""
    axes = [tune.learning_rate or [None], tune.epochs or [None], tune.min_steps or [None]]
    return [TuneSetting(lr, ep, st) for lr, ep, st in itertools.product(*axes)]


def setting_named(tune: TuneConfig, label: str) -> TuneSetting:
    for setting in tune_settings(tune):
        if setting.label == label:
            return setting
    raise UnknownName(f"tuning setting {label!r} is not a point of these axes "
                      f"({', '.join(s.label for s in tune_settings(tune))})")
