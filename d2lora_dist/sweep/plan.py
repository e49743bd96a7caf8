"""The frozen plan: the resolved experiment and the ordered cells, written once per run directory.

Array tasks map SLURM_ARRAY_TASK_ID to a cell through plan.json, so the mapping cannot
shift if someone edits the experiment file while jobs are queued.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import yaml

from d2lora_dist.config import RAN_BEFORE_THE_SETTING, Experiment, TrainSettings
from d2lora_dist.errors import InputError
from d2lora_dist.fileio import read_json, write_json_atomic, write_text_atomic
from d2lora_dist.layout import RunLayout
from d2lora_dist.memory_estimate import GIB
from d2lora_dist.strategy import Launch, cell_launch, requested_strategy
from d2lora_dist.sweep.grid import Cell, cell_suites, plan_cells, warmup_runs
from d2lora_dist.sweep.tune_axes import setting_named


class PlanError(InputError):
    """The run directory's frozen plan disagrees with the request."""


# Sections that say how results are judged, not how they are made: they may change after the plan is
# frozen (a report can declare its primary comparison once the pilot has run).
JUDGED_NOT_MADE = ("report",)


def freeze_plan(exp: Experiment, layout: RunLayout) -> list[Cell]:
    """Write experiment.yaml and plan.json, or check that the existing ones match in every setting but
    output_dir: a run directory copied or moved elsewhere is the same experiment (config.load_experiment
    reads a frozen file's output_dir as the folder that holds it)."""
    cells = plan_cells(exp)
    resolved = exp.to_dict()
    # Jobs may start in another working directory: freeze where the runs live absolutely.
    resolved["output_dir"] = str(layout.root.resolve().parent)
    if layout.experiment_file.is_file():
        frozen = _as_frozen_runs_it(yaml.safe_load(layout.experiment_file.read_text()))
        diffs = [d for d in _diff(_without_location(frozen), _without_location(resolved))
                 if d.split(".")[0].split(":")[0] not in JUDGED_NOT_MADE]
        if diffs:
            raise PlanError(f"{layout.experiment_file} was frozen with other settings ({'; '.join(diffs[:5])}). "
                            "Results of a run directory must come from one experiment: set those keys back to the frozen "
                            "values, use a new `name`, or move the run directory away.")
    else:
        write_text_atomic(layout.experiment_file, yaml.safe_dump(resolved, sort_keys=False))
    write_json_atomic(layout.plan_file, {"experiment": exp.name, "cells": [c.to_dict() for c in cells]})
    return cells


def _without_location(config: Any) -> Any:
    return {k: v for k, v in config.items() if k != "output_dir"} if isinstance(config, dict) else config


def load_plan(layout: RunLayout) -> list[Cell]:
    """The frozen cell order: array index i is cell i."""
    return [Cell.from_dict(row) for row in read_json(layout.plan_file)["cells"]]


def cell_at(layout: RunLayout, index: int) -> Cell:
    cells = load_plan(layout)
    if not 0 <= index < len(cells):
        raise PlanError(f"array index {index} outside the frozen plan of {len(cells)} cells ({layout.plan_file})")
    return cells[index]


def _as_frozen_runs_it(frozen: dict[str, Any]) -> dict[str, Any]:
    """The frozen file with today's defaults filled in, as the jobs that load it will run it, and the
    value a run directory frozen before a setting existed used for it (RAN_BEFORE_THE_SETTING). A
    new setting requested with another value is then a difference like any other."""
    from d2lora_dist.config import experiment_from_dict

    try:
        filled = experiment_from_dict(frozen).to_dict()
    except InputError:
        return frozen  # a file today's schema cannot read: compare it as written
    return _merge_missing(frozen, filled)


def _merge_missing(frozen: Any, filled: Any) -> Any:
    if isinstance(frozen, dict) and isinstance(filled, dict):
        return {key: _merge_missing(frozen[key], filled.get(key)) if key in frozen
                else RAN_BEFORE_THE_SETTING.get(key, filled[key]) for key in {**filled, **frozen}}
    if isinstance(frozen, list) and isinstance(filled, list) and len(frozen) == len(filled):
        return [_merge_missing(a, b) for a, b in zip(frozen, filled, strict=True)]
    return frozen


_MISSING = object()


def _diff(frozen: Any, requested: Any, prefix: str = "") -> list[str]:
    if isinstance(frozen, dict) and isinstance(requested, dict):
        out = []
        for key in sorted(set(frozen) | set(requested)):
            out += _diff(frozen.get(key, _MISSING), requested.get(key, _MISSING),
                         f"{prefix}.{key}" if prefix else str(key))
        return out
    if isinstance(frozen, list) and isinstance(requested, list) and len(frozen) == len(requested):
        return [d for i, (f, r) in enumerate(zip(frozen, requested, strict=True)) for d in _diff(f, r, f"{prefix}[{i}]")]
    if frozen == requested:
        return []
    return [f"{prefix}: {_shown(frozen)} -> {_shown(requested)}"]


def _shown(value: Any) -> str:
    return "(absent)" if value is _MISSING else repr(value)


@dataclass(frozen=True)
class Throughput:
    """Tokens one GPU processes per second: what the GPU-hour column assumes (stated with it)."""

    train: float
    eval: float


@dataclass(frozen=True)
class Workload:
    """Measured once per plan: trained tokens per example of each (task, method), eval tokens per suite item;
    of each warm-up (by name): tokens per example and the rows its dataset holds (its m when m is null)."""

    train_tokens_per_example: dict[tuple[str, str], float]
    eval_items: dict[str, int]
    eval_tokens_per_item: dict[str, float]
    warmup_tokens_per_example: dict[str, float] = field(default_factory=dict)
    warmup_rows: dict[str, int] = field(default_factory=dict)


@dataclass
class CellEstimate:
    cell: Cell
    done: bool
    train_examples: int  # examples the optimizer sees: n x the epochs the schedule really takes
    train_tokens: int
    eval_items: int
    eval_tokens: int
    launch: Launch
    gpu_hours: float

    @property
    def memory_gib(self) -> float | None:
        return round(self.launch.choice.estimate.total / GIB, 1) if self.launch.choice else None

    def to_dict(self) -> dict[str, Any]:
        choice = self.launch.choice
        return {**self.cell.to_dict(), "done": self.done, "train_examples": self.train_examples,
                "train_tokens": self.train_tokens, "eval_items": self.eval_items, "eval_tokens": self.eval_tokens,
                "strategy": choice.strategy if choice else None, "gpus": self.launch.num_processes,
                "memory_gib_per_device": self.memory_gib, "gpu_hours": self.gpu_hours}


def estimate(exp: Experiment, layout: RunLayout, work: Workload, speed: Throughput) -> list[CellEstimate]:
    """Work per cell: trained tokens (examples x epochs the schedule takes x tokens per example),
    evaluated tokens, the launch it gets (strategy, GPUs, memory per device) and GPU-hours at `speed`."""
    packed = not exp.slurm.whole_node and requested_strategy(exp) is not None
    launches: dict[str, Launch] = {}
    rows = []
    for cell in plan_cells(exp):
        if cell.method not in launches:
            launches[cell.method] = cell_launch(exp, [cell.method], packed)
        examples = trained_examples(_cell_settings(exp, cell), cell.n) if cell.trains else 0
        tokens = round(examples * work.train_tokens_per_example.get((cell.task, cell.method), 0.0))
        suites = cell_suites(exp, cell)
        items = sum(work.eval_items[s] for s in suites)
        eval_tokens = round(sum(work.eval_items[s] * work.eval_tokens_per_item[s] for s in suites))
        hours = (tokens / speed.train + eval_tokens / speed.eval) / 3600
        rows.append(CellEstimate(cell, layout.cell_result(cell.id).is_file(), examples, tokens, items, eval_tokens,
                                 launches[cell.method], hours))
    return rows


def _cell_settings(exp: Experiment, cell: Cell) -> TrainSettings:
    """The settings a cell trains with: its method's, a selection cell's point of the tuning axes (a final
    tuned cell's is chosen later: the method's here); lora_matched: with the warm-up's steps added."""
    from d2lora_dist.controls import matched_settings
    from d2lora_dist.inits import INITS

    settings = exp.methods[cell.method]
    if cell.selects and cell.tune is not None and exp.grid[cell.tune].tune is not None:
        settings = setting_named(exp.grid[cell.tune].tune, cell.setting).applied(settings)
    return matched_settings(exp, cell.warmup, settings, cell.n)[0] if INITS[cell.init].matched_steps else settings


@dataclass
class WarmupEstimate:
    """A warm-up run's work and GPU-hours, counted like a cell's training (no evaluation)."""

    key: str
    done: bool
    train_examples: int
    train_tokens: int
    gpu_hours: float


def warmup_estimates(exp: Experiment, layout: RunLayout, work: Workload, speed: Throughput) -> list[WarmupEstimate]:
    """Each warm-up run the grid starts from: examples the optimizer sees (m x the epochs the schedule takes),
    trained tokens and GPU-hours at `speed` (a run per LoRA init: each trains on the same rows)."""
    rows = []
    for run in warmup_runs(plan_cells(exp)):
        cfg = exp.warmup_configs()[run.name]
        m = cfg.n if cfg.n is not None else work.warmup_rows.get(run.name, 0)
        examples = trained_examples(cfg.train, m)
        tokens = round(examples * work.warmup_tokens_per_example.get(run.name, 0.0))
        rows.append(WarmupEstimate(run.key, layout.warmup_result_of(run.key).is_file(), examples, tokens,
                                   tokens / speed.train / 3600))
    return rows


def warmup_rows(exp: Experiment, layout: RunLayout) -> list[dict[str, Any]]:
    """Each warm-up run the grid starts from: its data, size, LoRA init, seed, whether it is done and
    how many cells wait on it (printed by `sweep plan`)."""
    cells = plan_cells(exp)
    rows = []
    for run in warmup_runs(cells):
        cfg = exp.warmup_configs()[run.name]
        rows.append({"key": run.key, "warmup": run.name, "lora_init": run.lora_init, "dataset": cfg.dataset.name,
                     "m": cfg.n, "seed": cfg.seed if run.seed is None else run.seed, "placebo": run.placebo,
                     "done": layout.warmup_result_of(run.key).is_file(),
                     "cells": sum(c.warmup_run == run for c in cells)})
    return rows


def trained_examples(settings: TrainSettings, n: int) -> int:
    """Examples the optimizer sees: min_steps may repeat the data beyond `epochs` (schedule.py decides)."""
    from d2lora_dist.schedule import plan_schedule

    schedule = plan_schedule(settings, n, 1)  # the world size does not change the steps of a global batch
    if settings.max_steps > 0:  # a fixed number of full global batches, the data repeating as needed
        return schedule.optimizer_steps * settings.global_batch_size
    return round(n * schedule.epochs)


def measure_workload(exp: Experiment, sample: int = 200) -> Workload:
    """Tokens per trained example of each (task, method) and per evaluated item of each suite, counted
    with the model's tokenizer through the chat template on the first `sample` rows; items per suite."""
    from d2lora_dist.modeling import load_tokenizer

    tokenizer = load_tokenizer(exp.model)
    methods = sorted({(c.task, c.method) for c in plan_cells(exp) if c.trains})
    per_example = {(task, method): _train_tokens(exp.tasks[task].dataset, method, exp.methods[method], tokenizer,
                                                 sample)[0] for task, method in methods}
    warmups = {}
    for name in sorted({run.name for run in warmup_runs(plan_cells(exp))}):
        cfg = exp.warmup_configs()[name]
        warmups[name] = _train_tokens(cfg.dataset, "sft", cfg.train, tokenizer, sample)
    items: dict[str, int] = {}
    per_item: dict[str, float] = {}
    for suite, cfg in exp.suites.items():
        all_items = _suite_items(exp, suite)
        items[suite] = min(len(all_items), cfg.limit) if cfg.limit is not None else len(all_items)
        per_item[suite] = _eval_tokens(cfg, all_items[:min(sample, items[suite])], tokenizer)
    return Workload(per_example, items, per_item, {name: w[0] for name, w in warmups.items()},
                    {name: w[1] for name, w in warmups.items()})


def _train_tokens(dataset: Any, method: str, settings: TrainSettings, tokenizer: Any,
                  sample: int) -> tuple[float, int]:
    """Mean tokens the trainer runs per example: prompt + response after the chat template, each side
    (chosen and rejected) cut at max_length; a row whose prompt fills max_length is dropped (0 tokens).
    And the rows the dataset holds in the method's form."""
    from d2lora_dist.data.lengths import record_lengths
    from d2lora_dist.data.loading import normalize
    from d2lora_dist.methods import get_method
    from d2lora_dist.train import training_rows

    every = list(normalize(dataset, get_method(method).form).records.values())
    records = every[:sample]
    # the rows the trainer gets (train.training_rows owns the step-wise preference format)
    phase = SimpleNamespace(method=method, records=records, settings=settings)
    counts = []
    for row in training_rows(phase, tokenizer):
        prompt, sides = record_lengths(row, tokenizer)
        counts.append(0 if prompt >= settings.max_length else sum(min(t, settings.max_length) for t in sides))
    return sum(counts) / max(1, len(counts)), len(every)


def _suite_items(exp: Experiment, suite: str) -> list[dict[str, Any]]:
    from d2lora_dist.data.selection import suite_items

    task = next((t for t, tc in exp.tasks.items() if suite in tc.suites), None)
    if exp.suites[suite].split == "validation":  # the rows of a task whose tuned block chooses on it
        task = task or next((b.task for b in exp.grid if b.tune is not None and b.tune.suite == suite), None)
        if task is None:
            return []
    return suite_items(exp, suite, task)


def _eval_tokens(cfg: Any, items: list[dict[str, Any]], tokenizer: Any) -> float:
    """Mean tokens one item costs, as its suite kind counts them (evaluate.suites.Suite.item_tokens:
    generation = the templated prompt + max_new_tokens; multiple choice = the context + every choice)."""
    from d2lora_dist.evaluate.suites import SUITES

    costs = [SUITES[cfg.kind].item_tokens(item, tokenizer, cfg) for item in items]
    return sum(costs) / max(1, len(costs))
