"""Where a cell's adapter starts: the registry of initialisations.

`lora` is the fresh PEFT adapter (B = 0); `d2lora` starts from the warm-up artifact. The controls
(docs/choices.md) are arms of their own beside them, each tied to a warm-up and compared with D2LoRA:
`lora_matched` is a fresh adapter given the warm-up's optimizer steps on the task's rows,
`d2lora_placebo` starts from a warm-up trained on responses shuffled across prompts, `random_b` is a
fresh adapter whose B is drawn with the warm-up's per-module norm. The schema's validation, the CLI's
choices, the cell runner and the report's labels all read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class InitSpec:
    label: str  # how tables and plots name it
    from_warmup: bool  # belongs to a warm-up (the warm-up axis; needs a `warmup` section)
    # the adapter it starts from: fresh (PEFT's draw), the warm-up's, or fresh with the warm-up's B norms
    start: Literal["fresh", "warmup", "random_b"] = "fresh"
    placebo: bool = False  # its warm-up trains on responses shuffled across prompts (controls.placebo_records)
    matched_steps: bool = False  # takes the warm-up's optimizer steps on top of the task's (controls.matched)
    # what n = 0 is: the base model (planned once, as `lora`), its own start (a warm-up), or nothing to evaluate
    at_n0: Literal["base", "own", "none"] = "base"
    rules_out: str = ""  # a control: the explanation of D2LoRA's gain its Δ against D2LoRA rules out

    @property
    def needs_warmup_adapter(self) -> bool:
        """Its cells wait for a trained warm-up (they start from it or read its B norms)."""
        return self.start != "fresh"


INITS: dict[str, InitSpec] = {
    "lora": InitSpec("LoRA", from_warmup=False),
    "d2lora": InitSpec("D2LoRA", from_warmup=True, start="warmup", at_n0="own"),
    "lora_matched": InitSpec("LoRA (matched steps)", from_warmup=True, matched_steps=True,
                             rules_out="more optimizer steps"),
    "d2lora_placebo": InitSpec("D2LoRA (placebo warm-up)", from_warmup=True, start="warmup", placebo=True,
                               at_n0="own", rules_out="any warm-up of this size, not its data"),
    "random_b": InitSpec("Random B", from_warmup=True, start="random_b", at_n0="none",
                         rules_out="B ≠ 0 at the start"),
}
BASELINE, TREATMENT = "lora", "d2lora"  # the report's Δ is TREATMENT − BASELINE, paired by seed
CONTROLS = tuple(name for name, spec in INITS.items() if spec.rules_out)
