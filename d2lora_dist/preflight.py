"""One preflight before any model loads: every check that needs data, the launch or Slurm.

The experiment schema already refused unknown keys, wrong types and cross-field mistakes
(config.validate). What is left needs more than the file: how many usable rows each dataset
really has against n + holdout, how many items each suite has against its limit, whether the
world size can produce each phase's global batch, and whether the Slurm request can hold the
launch. Every entry (warmup, adapt, eval, sweep plan/run/cell/submit) calls `preflight`, which
reports all problems at once, naming the key and the file, before anything expensive starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from d2lora_dist.config import Experiment, TrainSettings
from d2lora_dist.schedule import batch_problem
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep.grid import Cell

_SLURM_TIME = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$|^(\d+)$")


class PreflightError(ConfigError):
    """Problems found before any model loads; the message lists every one."""


@dataclass(frozen=True)
class Checks:
    """What an entry is about to do, so that exactly its checks run."""

    cells: tuple[Cell, ...] = ()
    warmup: bool = False
    suites: tuple[tuple[str, str | None], ...] = ()  # (suite, the task whose holdout it may evaluate)
    cell_world_size: int | None = None  # ranks a cell trains on; None = not known here (skip)
    warmup_world_size: int | None = None
    slurm: bool = False
    warmups: tuple[str, ...] = ()  # the warm-ups (names) to check when `warmup`; empty = every one

    def warmup_names(self, exp: Experiment) -> list[str]:
        if not self.warmup:
            return []
        return list(self.warmups) or [c.warmup for c in self.cells if c.warmup] or list(exp.warmup_configs())


def for_cells(exp: Experiment, cells: Iterable[Cell], world_size: int | None, warmup_world_size: int | None,
              slurm: bool = False) -> Checks:
    """What running these cells needs: their rows, their suites, their batches (and the warm-up's)."""
    from d2lora_dist.sweep.grid import cell_suites, needs_warmup

    cells = tuple(cells)
    suites = tuple((s, c.task) for c in cells if c.task in exp.tasks for s in cell_suites(exp, c))
    return Checks(cells, needs_warmup(list(cells)), suites, world_size, warmup_world_size, slurm)


def for_sweep(exp: Experiment, cells: Iterable[Cell], slurm: bool) -> Checks:
    """A whole sweep as its executor will launch it: cells on one node, the warm-up on slurm.nodes."""
    per_node = exp.launch.num_processes
    return for_cells(exp, cells, per_node, per_node * (exp.slurm.nodes if slurm else 1), slurm)


def preflight(exp: Experiment, checks: Checks, source: str) -> None:
    problems = _request_problems(exp, checks)
    if problems:  # the checks below look the requested task and method up
        raise PreflightError(problems, source)
    problems = [*_row_problems(exp, checks), *_suite_problems(exp, checks), *_batch_problems(exp, checks)]
    if checks.slurm:
        problems += slurm_problems(exp)
    if problems:
        raise PreflightError(problems, source)


# ---- the request -----------------------------------------------------------------------------
def _request_problems(exp: Experiment, checks: Checks) -> list[str]:
    """A cell named on the command line (`adapt`) must exist in the experiment."""
    from d2lora_dist.inits import INITS
    from d2lora_dist.lora_inits import is_lora_init

    problems = []
    for cell in checks.cells:
        if cell.task not in exp.tasks:
            problems.append(f"--task {cell.task!r}: not a task of the experiment ({sorted(exp.tasks)})")
        if cell.trains and cell.method not in exp.methods:
            problems.append(f"--method {cell.method!r}: no settings under `methods` ({sorted(exp.methods)})")
        if INITS[cell.init].from_warmup and cell.warmup not in exp.warmup_configs():
            problems.append(f"--init {cell.init}: the experiment has no warm-up {cell.warmup!r} "
                            f"(defined: {sorted(exp.warmup_configs())})")
        if not is_lora_init(cell.lora_init):
            problems.append(f"--lora-init {cell.lora_init!r}: unknown (valid: default, gaussian, pissa, olora, "
                            "pissa_niter_K)")
    return problems


# ---- data ----------------------------------------------------------------------------------
def _row_problems(exp: Experiment, checks: Checks) -> list[str]:
    from d2lora_dist.data.loading import DataError, normalize
    from d2lora_dist.data.subsets import usable_rows
    from d2lora_dist.methods import get_method

    problems: list[str] = []
    usable: dict[tuple[str, str], int | None] = {}
    for cell in sorted(c for c in checks.cells if c.trains):
        task = exp.tasks[cell.task]
        form = get_method(cell.method).form
        if (cell.task, form) not in usable:
            try:
                usable[cell.task, form] = usable_rows(normalize(task.dataset, form), exp.data_seed, task.holdout)
            except DataError as e:
                problems.append(f"tasks.{cell.task}.dataset: {e}")
                usable[cell.task, form] = None
        have = usable[cell.task, form]
        if have is not None and cell.n > have:
            problems.append(f"{cell.id}: n={cell.n} but task {cell.task!r} has only {have} usable {form} rows "
                            f"({task.dataset.name}, {task.holdout} held out); lower n in the grid or add data")
    for name in dict.fromkeys(checks.warmup_names(exp)):
        cfg, key = exp.warmup_configs()[name], exp.warmup_settings_key(name)
        if cfg.n is None:
            continue
        try:
            have = usable_rows(normalize(cfg.dataset, "sft"), exp.data_seed, 0)
        except DataError as e:
            problems.append(f"{key}.dataset: {e}")
            continue
        if cfg.n > have:
            problems.append(f"{key}.n: {cfg.n} but {cfg.dataset.name} has only {have} usable SFT rows")
    return problems


def _suite_problems(exp: Experiment, checks: Checks) -> list[str]:
    from d2lora_dist.data.loading import DataError
    from d2lora_dist.data.selection import suite_items

    problems: list[str] = []
    for name, task in dict.fromkeys(checks.suites):
        cfg = exp.suites[name]
        key = f"suites.{name}"
        if cfg.batch_size < 1:
            problems.append(f"{key}.batch_size: must be >= 1, got {cfg.batch_size}")
        if cfg.max_new_tokens < 1:
            problems.append(f"{key}.max_new_tokens: must be >= 1, got {cfg.max_new_tokens}")
        if cfg.limit is not None and cfg.limit < 1:
            problems.append(f"{key}.limit: must be >= 1 or null (all items), got {cfg.limit}")
            continue
        try:
            items = len(suite_items(exp, name, task))
        except DataError as e:
            problems.append(f"{key}: {e}")
            continue
        if items == 0:
            problems.append(f"{key}: no usable items to evaluate")
        elif cfg.limit is not None and cfg.limit > items:
            problems.append(f"{key}.limit: {cfg.limit} but the suite has only {items} items; lower it or use "
                            "null (all items)")
    return problems


# ---- launch --------------------------------------------------------------------------------
def _batch_problems(exp: Experiment, checks: Checks) -> list[str]:
    problems: list[str] = []
    if checks.warmup_world_size is not None:
        for name in dict.fromkeys(checks.warmup_names(exp)):
            problems += _batch(exp.warmup_configs()[name].train, f"{exp.warmup_settings_key(name)}.train",
                               checks.warmup_world_size)
    if checks.cell_world_size is not None:
        for method in sorted({c.method for c in checks.cells if c.trains}):
            problems += _batch(exp.methods[method], f"methods.{method}", checks.cell_world_size)
    return problems


def _batch(settings: TrainSettings, key: str, world: int) -> list[str]:
    problem = batch_problem(settings, key, world)
    return [problem] if problem else []


# ---- Slurm ---------------------------------------------------------------------------------
def slurm_seconds(text: str) -> int | None:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) in seconds; None if unreadable."""
    match = _SLURM_TIME.match(text.strip())
    if not match:
        return None
    if match.group(5) is not None:
        return int(match.group(5)) * 60
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.group(1, 2, 3, 4))
    if match.group(2) is None:  # MM:SS
        return minutes * 60 + seconds
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def slurm_problems(exp: Experiment) -> list[str]:
    s, launch = exp.slurm, exp.launch
    problems: list[str] = []
    limit = slurm_seconds(s.time)
    if limit is None:
        problems.append(f"slurm.time: {s.time!r} is not a Slurm time (e.g. 08:00:00 or 1-00:00:00)")
    elif s.signal_seconds >= limit:
        problems.append(f"slurm.signal_seconds: {s.signal_seconds} s is not below slurm.time ({s.time}); the "
                        "checkpoint signal would come before the job starts")
    if slurm_seconds(s.report.time) is None:
        problems.append(f"slurm.report.time: {s.report.time!r} is not a Slurm time (e.g. 01:00:00)")
    if s.report.cpus_per_task < 1:
        problems.append(f"slurm.report.cpus_per_task: must be >= 1, got {s.report.cpus_per_task}")
    if s.nodes < 1:
        problems.append(f"slurm.nodes: must be >= 1, got {s.nodes}")
    if s.max_parallel < 1:
        problems.append(f"slurm.max_parallel: must be >= 1, got {s.max_parallel}")
    if s.gpus_per_node and launch.num_processes > s.gpus_per_node:
        problems.append(f"launch.num_processes: {launch.num_processes} ranks per node but slurm.gpus_per_node "
                        f"asks for {s.gpus_per_node} GPUs")
    problems += [f"launch.{key}: file {path!r} not found" for key, path in _launch_files(exp)
                 if not _exists(path)]
    return problems


def _launch_files(exp: Experiment) -> Iterable[tuple[str, str]]:
    for key in ("accelerate_config", "deepspeed_config"):
        path = getattr(exp.launch, key)
        if path:
            yield key, path


def _exists(path: str) -> bool:
    """As given (the working directory first), else the shipped copy (d2lora_dist/shipped.py)."""
    from d2lora_dist.shipped import find_file

    return find_file(path) is not None
