"""The local executor: the warm-ups the cells need, then every unfinished cell, then (in entries) the report.

A warm-up that fails holds back only the cells that start from it; the others run.

Cells whose launch is one plain process (the CPU default, DDP on one GPU) run in a cell worker:
one process that loads the base model once and runs them one after another (sweep/worker.py), so
each pays for neither the imports nor the model load again. Every other cell (`accelerate launch`,
DeepSpeed, several ranks) runs as its own launch, so memory is returned between cells. A failing
cell is named and the sweep goes on; `cell_worker=False` gives every cell its own process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from d2lora_dist.config import Experiment
from d2lora_dist.layout import RunLayout
from d2lora_dist.shipped import for_command
from d2lora_dist.strategy import Launch, cell_launch, warmup_launch
from d2lora_dist.sweep.grid import Cell, WarmupRun, warmup_runs


class LaunchFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class CellJob:
    """One launch of the local executor: one cell (`sweep cell`), or a worker for several (`sweep worker`)."""

    launch: Launch
    cells: tuple[Cell, ...]
    worker: bool

    def cli_args(self, config: list[str]) -> list[str]:
        if self.worker:
            return ["sweep", "worker", *config, "--cells", *(c.id for c in self.cells)]
        return ["sweep", "cell", *config, "--cell", self.cells[0].id]

    def describe(self) -> str:
        ids = ", ".join(c.id for c in self.cells)
        return f"cell worker ({len(self.cells)} cells: {ids})" if self.worker else f"cell {ids}"


def plan_jobs(exp: Experiment, cells: list[Cell], cell_worker: bool) -> list[CellJob]:
    """Which cells run how, in order: consecutive cells launched as one plain process share a worker
    (when `cell_worker`); every other cell is a launch of its own."""
    jobs: list[CellJob] = []
    for cell in cells:
        launch = cell_launch(exp, [cell.method], packed=False)
        shared = cell_worker and launch.accelerate_config is None
        if shared and jobs and jobs[-1].worker:
            jobs[-1] = CellJob(launch, (*jobs[-1].cells, cell), True)
        else:
            jobs.append(CellJob(launch, (cell,), shared))
    return jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(exp: Experiment, launch: Launch, cli_args: list[str]) -> list[str]:
    """`accelerate launch ... -m d2lora_dist.cli ARGS`, or plain Python for one process."""
    module = ["-m", "d2lora_dist.cli", *cli_args]
    if launch.accelerate_config is None:
        return [sys.executable, *module]
    port = exp.launch.main_process_port or free_port()
    config = for_command(launch.accelerate_config)  # the user's file as given, else the shipped copy
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *launch.accelerate_flags(),
            "--num_processes", str(launch.num_processes), "--main_process_port", str(port), *module]


def run_launch(exp: Experiment, launch: Launch, cli_args: list[str], what: str) -> None:
    command = launch_command(exp, launch, cli_args)
    print(f"[launch] {what}: {launch.describe()}", flush=True)
    print(f"$ {' '.join(command)}", flush=True)
    code = subprocess.call(command, env=os.environ.copy())
    if code != 0:
        raise LaunchFailed(f"{what} failed with exit code {code} (command: {' '.join(command)})")


def run_warmups(exp: Experiment, layout: RunLayout, cells: list[Cell], config: list[str]) -> set[WarmupRun]:
    """Train each warm-up these cells start from that is not done yet; returns the ones that failed."""
    failed: set[WarmupRun] = set()
    for run in warmup_runs(cells):
        if layout.warmup_result_of(run.key).is_file():
            continue
        try:
            run_launch(exp, warmup_launch(exp, name=run.name), ["warmup", *config, "--warmup", run.key],
                       f"warm-up {run.key}")
        except LaunchFailed as e:
            print(f"!!! {e}; its cells are held back", flush=True)
            failed.add(run)
    return failed


def run_sweep(exp: Experiment, layout: RunLayout, cells: list[Cell], experiment_file: Path,
              cell_worker: bool = True) -> list[str]:
    """Run what is not done; returns the ids of cells that failed (the sweep goes on past them)."""
    config = ["-c", str(experiment_file)]
    todo = [c for c in cells if not layout.cell_result(c.id).is_file()]
    held_back = run_warmups(exp, layout, todo, config)
    failed = [c.id for c in todo if c.warmup_run in held_back]
    todo = [c for c in todo if c.warmup_run not in held_back]
    print(f"{len(cells) - len(todo) - len(failed)} of {len(cells)} cells done; running {len(todo)}"
          + (f"; {len(failed)} held back by a failed warm-up" if failed else ""), flush=True)
    started = 0
    for job in plan_jobs(exp, todo, cell_worker):
        print(f"=== cell{'s' if len(job.cells) > 1 else ''} {started + 1}"
              f"{f'-{started + len(job.cells)}' if len(job.cells) > 1 else ''}/{len(todo)}: {job.describe()}",
              flush=True)
        started += len(job.cells)
        try:
            run_launch(exp, job.launch, job.cli_args(config), job.describe())
        except LaunchFailed as e:
            print(f"!!! {e}", flush=True)
        failed += [c.id for c in job.cells if not layout.cell_result(c.id).is_file()]  # result.json = done
    return failed
