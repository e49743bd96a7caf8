"""What a phase trains on and what a suite evaluates, from the experiment's datasets."""

from __future__ import annotations

from typing import Any

from d2lora_dist.config import DatasetRef, Experiment
from d2lora_dist.data.loading import DataError, Normalized, load_table, normalize
from d2lora_dist.data.subsets import Subset, holdout_indices, records_of, take_subset
from d2lora_dist.data.validation import validation_indices, validation_record


def training_records(ref: DatasetRef, form: str, n: int | None, data_seed: int, seed: int,
                     holdout: int = 0) -> tuple[list[dict[str, Any]], Subset]:
    """First n usable rows of seed `seed`'s order (all usable rows when n is None)."""
    data = normalize(ref, form)
    subset = take_subset(data, n, data_seed, seed, holdout)
    return records_of(data, subset.indices), subset


def task_records(exp: Experiment, task: str, form: str, n: int, seed: int) -> tuple[list[dict[str, Any]], Subset]:
    """A cell's training rows: its seed draws them, so LoRA and D2LoRA at one seed share them. The
    validation rows follow the holdout in the permutation, so both are held out together."""
    cfg = exp.tasks[task]
    return training_records(cfg.dataset, form, n, exp.data_seed, seed, cfg.holdout + cfg.validation)


def warmup_records(exp: Experiment, name: str, seed: int | None = None) -> tuple[list[dict[str, Any]], Subset]:
    """A warm-up's rows: the first n of its seed's permutation (warm-ups of one dataset and seed nest);
    `seed` = a cell's seed for a per-seed warm-up, else the warm-up's own."""
    cfg = exp.warmup_configs()[name]
    return training_records(cfg.dataset, "sft", cfg.n, exp.data_seed, cfg.seed if seed is None else seed)


def suite_items(exp: Experiment, suite: str, task: str | None) -> list[dict[str, Any]]:
    """Evaluation items; a suite without a dataset evaluates the task's held-out rows."""
    return suite_source(exp, suite, task)[0]


def suite_source(exp: Experiment, suite: str, task: str | None) -> tuple[list[dict[str, Any]], Normalized]:
    """A suite's items and the normalised dataset they come from (whose `bad` rows it cannot evaluate)."""
    cfg = exp.suites[suite]
    if cfg.split == "validation":
        records, _, data = _validation(exp, task)
        return records, data
    if cfg.dataset is not None:
        data = normalize(cfg.dataset, "eval")
        return list(data.records.values()), data
    if task is None or exp.tasks[task].holdout <= 0:
        raise DataError(f"suite {suite!r} evaluates a task holdout, but task {task!r} holds none out")
    tcfg = exp.tasks[task]
    table = load_table(tcfg.dataset)
    data = normalize(tcfg.dataset, "eval", table=table)
    return records_of(data, holdout_indices(data.total_rows, exp.data_seed, tcfg.holdout)), data


def validation_items(exp: Experiment, task: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The task's validation rows in eval form, and their record (data/validation.py); the test items
    (the holdout, a suite's dataset) are not read."""
    records, record, _ = _validation(exp, task)
    return records, record


def _validation(exp: Experiment, task: str | None) -> tuple[list[dict[str, Any]], dict[str, Any], Normalized]:
    if task is None or exp.tasks[task].validation <= 0:
        raise DataError(f"a split: validation suite evaluates a task's validation rows, but task {task!r} holds "
                        "none out (tasks.<name>.validation)")
    tcfg = exp.tasks[task]
    data = normalize(tcfg.dataset, "eval")
    indices = validation_indices(data.total_rows, exp.data_seed, tcfg.holdout, tcfg.validation)
    usable = [i for i in indices if i in data.records]
    record = validation_record(data.name, data.source, exp.data_seed, tcfg.holdout, tcfg.validation, indices, usable,
                               [str(data.records[i].get("id", "")) for i in usable])
    return records_of(data, indices), record, data
