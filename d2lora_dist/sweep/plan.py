"""The frozen plan: the resolved experiment and the ordered cells, written once per run directory.

Array tasks map SLURM_ARRAY_TASK_ID to a cell through plan.json, so the mapping cannot
shift if someone edits the experiment file while jobs are queued.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import yaml

from d2lora_dist.config import Experiment
from d2lora_dist.errors import InputError
from d2lora_dist.fileio import read_json, write_json_atomic, write_text_atomic
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.grid import Cell, plan_cells


class PlanError(InputError):
    """The run directory's frozen plan disagrees with the request."""


def freeze_plan(exp: Experiment, layout: RunLayout) -> list[Cell]:
    """Write experiment.yaml and plan.json, or check that the existing ones match."""
    cells = plan_cells(exp)
    resolved = exp.to_dict()
    # Jobs may start in another working directory: freeze where the runs live absolutely.
    resolved["output_dir"] = str(layout.root.resolve().parent)
    if layout.experiment_file.is_file():
        frozen = yaml.safe_load(layout.experiment_file.read_text())
        diffs = _diff(frozen, resolved)
        if diffs:
            raise PlanError(f"{layout.experiment_file} was frozen with other settings ({'; '.join(diffs[:5])}). "
                            "Results of a run directory must come from one experiment: use a new `name`, or "
                            "move the run directory away.")
    else:
        write_text_atomic(layout.experiment_file, yaml.safe_dump(resolved, sort_keys=False))
    write_json_atomic(layout.plan_file, {"experiment": exp.name, "cells": [c.to_dict() for c in cells]})
    return cells


def load_plan(layout: RunLayout) -> list[Cell]:
    """The frozen cell order: array index i is cell i."""
    return [Cell.from_dict(row) for row in read_json(layout.plan_file)["cells"]]


def cell_at(layout: RunLayout, index: int) -> Cell:
    cells = load_plan(layout)
    if not 0 <= index < len(cells):
        raise PlanError(f"array index {index} outside the frozen plan of {len(cells)} cells ({layout.plan_file})")
    return cells[index]


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


@dataclass
class CellEstimate:
    cell: Cell
    done: bool
    train_examples: int
    train_tokens: int
    eval_items: int


def estimate(exp: Experiment, layout: RunLayout, tokens_per_example: dict[str, float],
             eval_items: dict[str, int]) -> list[CellEstimate]:
    """Work per cell: task tokens to train on (examples x epochs x mean length) and items to evaluate."""
    rows = []
    for cell in plan_cells(exp):
        epochs = exp.methods[cell.method].epochs if cell.trains else 0
        examples = cell.n * math.ceil(epochs)
        tokens = int(examples * tokens_per_example.get(cell.task, 0.0))
        items = sum(eval_items.get(s, 0) for s in exp.tasks[cell.task].suites)
        rows.append(CellEstimate(cell, layout.cell_result(cell.id).is_file(), examples, tokens, items))
    return rows


def measure_workload(exp: Experiment, sample: int = 200) -> tuple[dict[str, float], dict[str, int]]:
    """Mean tokens per training example of each task (first `sample` rows) and items per suite."""
    from d2lora_dist.data.lengths import record_lengths
    from d2lora_dist.data.loading import normalize
    from d2lora_dist.data.selection import suite_items
    from d2lora_dist.modeling import load_tokenizer

    tokenizer = load_tokenizer(exp.model)
    per_task: dict[str, float] = {}
    for name, task in exp.tasks.items():
        records = list(normalize(task.dataset, "sft").records.values())[:sample]
        # prompt + response tokens through the chat template (data.lengths counts them as the trainers do)
        lengths = [max(record_lengths(r, tokenizer)[1]) for r in records]
        per_task[name] = sum(lengths) / max(1, len(lengths))
    items: dict[str, int] = {}
    for suite, cfg in exp.suites.items():
        task = next((t for t, tc in exp.tasks.items() if suite in tc.suites), None)
        count = len(suite_items(exp, suite, task))
        items[suite] = min(count, cfg.limit) if cfg.limit is not None else count
    return per_task, items
