"""Where a cell's adapter starts: the registry of initialisations.

`lora` is the fresh PEFT adapter (B = 0); `d2lora` starts from the warm-up artifact. The schema's
validation, the CLI's choices, the cell runner and the report's labels all read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class InitSpec:
    label: str  # how tables and plots name it
    from_warmup: bool  # starts from the warm-up adapter (and so needs a `warmup` section)


INITS: dict[str, InitSpec] = {
    "lora": InitSpec("LoRA", from_warmup=False),
    "d2lora": InitSpec("D2LoRA", from_warmup=True),
}
BASELINE, TREATMENT = "lora", "d2lora"  # the report's Δ is TREATMENT − BASELINE, paired by seed
