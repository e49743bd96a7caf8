"""The arms a report compares and the Δ pairs between them.

An arm is a cell's init with its axes (sweep/grid.Cell.arm): `lora`, `d2lora`, `d2lora@m384`,
`lora+pissa`, `d2lora@m64+pissa`. Every D2LoRA arm is paired with the vanilla arm of the same LoRA
init, so Δ isolates the warm-up: D2LoRA(m, n) − LoRA(n) at one LoRA init. An experiment without the
axes has the two arms `lora` and `d2lora` and the one pair it always had. A control arm (`lora_matched`,
`d2lora_placebo`, `random_b`) is paired with LoRA like D2LoRA is, and D2LoRA with it (D2LoRA − control)
at the same warm-up and LoRA init.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from d2lora_dist.config import SINGLE_WARMUP
from d2lora_dist.inits import BASELINE, CONTROLS, INITS, TREATMENT
from d2lora_dist.lora_inits import DEFAULT_LORA_INIT, LORA_INITS, is_lora_init, lora_init_label
from d2lora_dist.sweep.grid import arm_name


@dataclass(frozen=True)
class Arm:
    init: str
    warmup: str = ""  # "" for a vanilla arm
    lora_init: str = DEFAULT_LORA_INIT

    @classmethod
    def parse(cls, arm: str) -> Arm:
        rest, _, lora_init = arm.partition("+")
        init, _, warmup = rest.partition("@")
        from_warmup = init in INITS and INITS[init].from_warmup
        return cls(init, warmup or (SINGLE_WARMUP if from_warmup else ""), lora_init or DEFAULT_LORA_INIT)

    @property
    def name(self) -> str:
        return arm_name(self.init, self.warmup, self.lora_init)

    @property
    def from_warmup(self) -> bool:
        return self.init in INITS and INITS[self.init].from_warmup

    @property
    def label(self) -> str:
        """LoRA, D2LoRA, D2LoRA(m384), LoRA · PiSSA, D2LoRA(m64) · PiSSA."""
        base = INITS[self.init].label if self.init in INITS else self.init
        if self.warmup and self.warmup != SINGLE_WARMUP:
            base += f"({self.warmup})"
        if self.lora_init != DEFAULT_LORA_INIT:
            base += f" · {lora_init_label(self.lora_init) if is_lora_init(self.lora_init) else self.lora_init}"
        return base

    def order(self) -> tuple:
        known = list(LORA_INITS)
        lora_init = known.index(self.lora_init) if self.lora_init in known else len(known)
        init = list(INITS).index(self.init) if self.init in INITS else len(INITS)
        return (lora_init, self.lora_init, init, _natural(self.warmup))


def _natural(name: str) -> tuple:
    """m64 before m192: digits compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


@dataclass(frozen=True)
class Pair:
    """Δ = treatment − baseline, paired by seed and item."""

    baseline: str
    treatment: str

    @property
    def label(self) -> str:
        return f"{Arm.parse(self.treatment).label} − {Arm.parse(self.baseline).label}"


LEGACY_PAIR = Pair(BASELINE, TREATMENT)


def ordered_arms(arms: set[str] | list[str]) -> list[str]:
    """Vanilla before D2LoRA, per LoRA init in registry order, warm-ups by name."""
    return sorted(set(arms), key=lambda a: Arm.parse(a).order())


def pairs_of(arms: list[str]) -> list[Pair]:
    """Each warm-started arm (D2LoRA, a control) against the vanilla arm of its LoRA init, then D2LoRA
    against each control of its warm-up and LoRA init (when those arms exist)."""
    present = set(arms)
    out = []
    for name in ordered_arms(arms):
        arm = Arm.parse(name)
        baseline = Arm(BASELINE, "", arm.lora_init).name
        if arm.from_warmup and baseline in present:
            out.append(Pair(baseline, name))
    for name in ordered_arms(arms):
        arm = Arm.parse(name)
        treatment = Arm(TREATMENT, arm.warmup, arm.lora_init).name
        if arm.init in CONTROLS and treatment in present:
            out.append(Pair(name, treatment))
    return out or [LEGACY_PAIR]
