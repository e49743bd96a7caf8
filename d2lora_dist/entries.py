"""What each `d2lora` command does, whole: preflight, the work, preemption and the exit code.

The CLI parses arguments and calls one of these; an entry owns everything between. Training
entries run preemptible: Slurm's SIGUSR1 checkpoints the phase at a step boundary on every
rank and the process exits PREEMPTED_EXIT_CODE (75) so the job requeues itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from d2lora_dist.config import Experiment
from d2lora_dist.config_source import ConfigSource, held_problems
from d2lora_dist.errors import InputError
from d2lora_dist.layout import RunLayout
from d2lora_dist.preflight import Checks, PreflightError, for_cells, for_sweep, preflight
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep.grid import Cell, plan_cells

EXIT_OK, EXIT_FAILED_CELLS = 0, 1


def warmup(exp: Experiment, layout: RunLayout, source: str | ConfigSource, key: str | None = None) -> int:
    """One warm-up run (`--warmup KEY`), or every one the plan needs, in turn."""
    from d2lora_dist.distributed import check_single_process_gpus, world_size
    from d2lora_dist.warmup import resolve_warmup, run_warmup

    check_single_process_gpus()  # before the preflight loads any data
    with partly_built(source):
        runs = resolve_warmup(exp, key)
        checks = Checks(warmup=True, warmup_world_size=world_size(), warmups=tuple(r.name for r in runs))
    preflight(exp, checks, source)
    for run in runs:
        run_preemptible(lambda callbacks, run=run: run_warmup(exp, layout, callbacks=callbacks, run=run))
    return EXIT_OK


def cell(exp: Experiment, layout: RunLayout, cell: Cell, source: str | ConfigSource, wait: bool = True) -> int:
    """One cell (`adapt`, or an array task's `sweep cell`): train if it trains, evaluate, result.json.
    Another process on the cell is waited for (`wait`), else this exits EXIT_BUSY at once (sweep run's
    launches: it comes back to the cell later)."""
    from d2lora_dist.distributed import check_single_process_gpus, world_size
    from d2lora_dist.sweep.cell import run_cell
    from d2lora_dist.sweep.claims import EXIT_BUSY, Busy

    check_single_process_gpus()  # before the preflight loads any data
    with partly_built(source):
        checks = for_cells(exp, [cell], world_size(), None)
    preflight(exp, checks, source)
    try:
        return run_preemptible(lambda callbacks: run_cell(exp, layout, cell, callbacks=callbacks, wait=wait))
    except Busy as e:
        print(f"{e}; skipped", flush=True)
        return EXIT_BUSY


def worker(exp: Experiment, layout: RunLayout, cells: list[Cell] | None, source: str) -> int:
    """Several cells in this one process on one loaded base (the local executor's cell worker); each cell is
    checked (preflight) and run as `cell` would, a failing one is reported and the next runs. 1 if any failed.
    `cells` None: their ids arrive on stdin, one per line, until it closes (a slot of the local executor)."""
    from d2lora_dist.sweep.worker import run_cells, serve_cells

    failed = run_cells(exp, layout, cells, source) if cells is not None else serve_cells(exp, layout, sys.stdin,
                                                                                           source)
    if failed:
        print(f"{len(failed)} cell(s) failed in the worker: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED_CELLS
    return EXIT_OK


def evaluate(exp: Experiment, layout: RunLayout, source: str | ConfigSource, adapter: Path | None, task: str | None,
             suites: list[str] | None, out: Path | None) -> dict[str, dict[str, Any]]:
    from d2lora_dist.evaluate.adapter_eval import evaluate_suites

    with partly_built(source):
        if task is not None and task not in exp.tasks:
            raise PreflightError([f"--task {task!r}: not a task of the experiment ({sorted(exp.tasks)})"], source)
        suites = suites or (exp.tasks[task].suites if task is not None else sorted(exp.suites))
        checks = Checks(suites=tuple((s, task) for s in suites))
    preflight(exp, checks, source)
    out = out or layout.eval_dir(adapter.name if adapter else "base")
    return evaluate_suites(exp, task, suites, adapter, lambda s: out / f"{s}.jsonl")


def plan(exp: Experiment, layout: RunLayout, source: str | ConfigSource, speed: Any) -> tuple[list[Any], list[Any]]:
    """The cells with the work, launch and cost each needs (sweep.plan.CellEstimate), and the warm-ups'
    (sweep.plan.WarmupEstimate), checked first."""
    from d2lora_dist.sweep.plan import estimate, measure_workload, warmup_estimates

    with partly_built(source):
        checks = for_sweep(exp, plan_cells(exp), slurm=False)
    preflight(exp, checks, source)
    work = measure_workload(exp)
    return estimate(exp, layout, work, speed), warmup_estimates(exp, layout, work, speed)


def run_sweep(exp: Experiment, layout: RunLayout, source: str | ConfigSource, cell_worker: bool = True,
              slots: int | None = None) -> int:
    """Warm-up, every unfinished cell and the report on this machine; 1 when some cell failed.
    `cell_worker`: cells launched as one plain process share a worker process per slot; `slots`: cells
    run at once (None: as many as the machine holds; sweep/slots.py)."""
    from d2lora_dist.report import report
    from d2lora_dist.sweep.local import run_sweep as run_local
    from d2lora_dist.sweep.plan import freeze_plan

    with partly_built(source):
        checks = for_sweep(exp, plan_cells(exp), slurm=False)
    preflight(exp, checks, source)
    failed = run_local(exp, layout, freeze_plan(exp, layout), layout.experiment_file, cell_worker, slots)
    report(exp, layout)
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}; rerun the same command to retry them",
              file=sys.stderr)
        return EXIT_FAILED_CELLS
    return EXIT_OK


def submit(exp: Experiment, layout: RunLayout, source: str | ConfigSource, dry_run: bool, only_failed: bool) -> Any:
    from d2lora_dist.sweep.slurm import submit as submit_jobs

    with partly_built(source):
        checks = for_sweep(exp, plan_cells(exp), slurm=True)
    preflight(exp, checks, source)
    return submit_jobs(exp, layout, dry_run=dry_run, only_failed=only_failed)


@contextmanager
def partly_built(source: str | ConfigSource) -> Iterator[None]:
    """Work an entry does before its preflight (which cells, which warm-ups). On an experiment with field
    problems it may trip over a broken field: then those problems are the answer, with what it raised."""
    try:
        yield
    except (TypeError, AttributeError, KeyError, InputError) as e:
        pending = held_problems(source)
        if not pending:
            raise
        extra = e.problems if isinstance(e, ConfigError) else [str(e)] if isinstance(e, InputError) else []
        raise PreflightError(pending + extra, source) from e


def run_preemptible(phase: Callable[[list[Any]], Any]) -> int:
    """Run a training phase so that SIGUSR1 (Slurm's warning) checkpoints it and exits 75."""
    from d2lora_dist.sweep.preemption import PreemptionCallback, PreemptionWatcher, exit_if_preempted
    from d2lora_dist.train import Preempted

    watcher = PreemptionWatcher()
    try:
        phase([PreemptionCallback(watcher)])
    except Preempted as e:
        print(str(e), file=sys.stderr)
        exit_if_preempted(watcher)  # waits for every rank, then exits PREEMPTED_EXIT_CODE
        raise
    return EXIT_OK
