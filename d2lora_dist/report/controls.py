"""D2LoRA against each control arm (inits.py, controls.py), under what each control rules out; and the
line that says whether D2LoRA's seeds share one warm-up draw.

A control's Δ is D2LoRA − control, paired by seed and item like D2LoRA − LoRA, with the same intervals
and verdicts (report.paired): a gain that survives it is not explained by what the control has too.
"""

from __future__ import annotations

from d2lora_dist.inits import CONTROLS, INITS, TREATMENT
from d2lora_dist.methods import method_label
from d2lora_dist.report.arms import Arm, Pair
from d2lora_dist.report.collect import Collection
from d2lora_dist.report.paired import Deltas
from d2lora_dist.report.tables import TableSpec, fmt_delta
from d2lora_dist.sweep.grid import NO_TRAINING


def control_pairs(pairs: list[Pair]) -> list[Pair]:
    """The pairs D2LoRA − control among a task's pairs."""
    return [p for p in pairs if Arm.parse(p.baseline).init in CONTROLS and Arm.parse(p.treatment).init == TREATMENT]


def render_controls(coll: Collection, specs: list[TableSpec], deltas: Deltas) -> list[str]:
    """A section per control present: its Δ against D2LoRA at every trained n of each task-suite table."""
    by_control: dict[str, list[str]] = {}
    for spec in specs:
        if spec.role != "task" or spec.method == NO_TRAINING:
            continue
        ns = [n for n in spec.ns if n > 0]
        metric, label = spec.metrics[0]
        for pair in control_pairs(deltas.pairs(spec.task)):
            shown = [fmt_delta(deltas.get(spec.task, spec.method, n, spec.suite, metric, pair)) for n in ns]
            by_control.setdefault(Arm.parse(pair.baseline).init, []).extend([
                f"{spec.task} · {method_label(spec.method)} · {spec.suite} {label}, Δ ({pair.label}):", "",
                "| n | " + " | ".join(str(n) for n in ns) + " |", "|---|" + "---:|" * len(ns),
                "| Δ | " + " | ".join(shown) + " |", ""])
    if not by_control:
        return []
    out = ["## D2LoRA against each control", "",
           "Each control shares one ingredient with D2LoRA and lacks its warm-up data's content; Δ = D2LoRA − "
           "control, paired and judged like D2LoRA − LoRA. A resolved positive Δ rules out the explanation in "
           "the heading (docs/choices.md).", ""]
    for control in CONTROLS:
        if control in by_control:
            out += [f"### Rules out {INITS[control].rules_out}: {INITS[control].label}", "", *by_control[control]]
    return out


def warmup_draw_note(coll: Collection) -> list[str]:
    """Whether D2LoRA's seeds share one warm-up draw (`warmup.seeds: single`) or each start from their own
    (`per_cell`), from the cells themselves (sweep/grid.Cell.warmup_per_seed)."""
    shared = {c.warmup: c.warmup_per_seed for c in coll.cells() if c.warmup_run is not None}
    single = sorted(w for w, per_seed in shared.items() if not per_seed)
    per_cell = sorted(w for w, per_seed in shared.items() if per_seed)
    lines = []
    if single:
        lines.append(f"Warm-up {', '.join(single)}: one warm-up draw. Every seed starts from the same warm-up "
                     "run, so D2LoRA's intervals hold the task phase's seed-to-seed variation, not the warm-up's "
                     "own (`warmup.seeds: per_cell` samples it).")
    if per_cell:
        lines.append(f"Warm-up {', '.join(per_cell)}: one warm-up per seed; a cell of seed s starts from "
                     "warm-up s, so the intervals include the warm-up's own randomness.")
    return [*lines, ""] if lines else []
