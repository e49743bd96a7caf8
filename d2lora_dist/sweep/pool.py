"""Run a queue of cells on the slots of one machine: whichever slot is free takes the next cell.

A slot runs cells launched as one plain process in a cell worker it keeps (sweep/worker.py: the base
model loads once per slot), fed one cell id at a time on stdin; any other cell (`accelerate launch`,
several ranks, or the worker switched off) is a launch of its own in that slot. A worker that dies
fails the cell it had and is started again for the next one. With one slot the launches write to this
terminal as they always did; with several, each slot appends to its own log file and the terminal
shows which cell starts and ends where.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from d2lora_dist.config import Experiment
from d2lora_dist.layout import RunLayout
from d2lora_dist.strategy import Launch, cell_launch
from d2lora_dist.sweep.grid import Cell
from d2lora_dist.sweep.slots import Slot, SlotPlan
from d2lora_dist.sweep.worker import REPORT_FD_ENV

# How a launch is run: (launch, CLI arguments, what it is, extra environment, output file or None) -> exit code
Runner = Callable[[Launch, list[str], str, dict[str, str], "IO[str] | None"], int]


@dataclass
class Progress:
    """Cells started and ended, printed from every slot's thread under one lock."""

    total: int
    started: int = 0
    ended: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, cell: Cell, slot: Slot, shared: bool) -> None:
        with self.lock:
            self.started += 1
            print(f"=== cell {self.started}/{self.total}: {cell.id}" + (f" on {slot.describe()}" if shared else ""),
                  flush=True)

    def end(self, cell: Cell, slot: Slot, ok: bool, seconds: float, log: Path | None) -> None:
        with self.lock:
            self.ended += 1
            where = f" (log: {log})" if log is not None and not ok else ""
            print(f"[{slot.describe()}] {cell.id} {'done' if ok else 'FAILED'} in {seconds:.0f}s; "
                  f"{self.ended}/{self.total} ended{where}", flush=True)


class CellQueue:
    def __init__(self, cells: list[Cell]) -> None:
        self._cells = list(reversed(cells))
        self._lock = threading.Lock()

    def take(self) -> Cell | None:
        with self._lock:
            return self._cells.pop() if self._cells else None


class WorkerProcess:
    """A `sweep worker --cells-from-stdin` of one slot: give it a cell, wait for its report."""

    def __init__(self, command: list[str], env: dict[str, str], out: IO[str] | None) -> None:
        read, write = os.pipe()
        try:
            self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=out,
                                            stderr=subprocess.STDOUT if out is not None else None,
                                            env=env | {REPORT_FD_ENV: str(write)}, pass_fds=(write,), text=True)
        finally:
            os.close(write)  # the worker holds the only write end: its exit ends our reads
        self.reports = os.fdopen(read)

    def run(self, cell: Cell) -> bool | None:
        """True/False as the worker reports the cell; None when the worker died before reporting it."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(cell.id + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return None
        line = self.reports.readline().split()
        if not line:
            return None
        if line[0] != cell.id:
            raise RuntimeError(f"cell worker reported {line[0]!r} while running {cell.id!r}")
        return line[1] == "ok"

    def close(self) -> int:
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        code = self.process.wait()
        self.reports.close()
        return code


def runs_in_worker(launch: Launch, cell_worker: bool) -> bool:
    """A cell launched as one plain process runs in its slot's worker (unless the worker is off)."""
    return cell_worker and launch.accelerate_config is None


def expected_work_first(cells: list[Cell]) -> list[Cell]:
    """Cells with the most training first (preference pairs cost about three sequences: chosen, rejected
    and the reference pass), evaluation-only cells last to fill the gaps: slots then end close together."""
    def work(cell: Cell) -> int:
        return cell.n * (3 if cell.method in ("dpo", "orpo") else 1) if cell.trains else 0

    return sorted(cells, key=lambda c: -work(c))


def run_on_slots(exp: Experiment, layout: RunLayout, cells: list[Cell], plan: SlotPlan, config: list[str],
                 cell_worker: bool, runner: Runner, worker_command: Callable[[Launch], list[str]]) -> None:
    """Every cell of `cells` on the plan's slots (one after another on one slot, else busiest first)."""
    shared = len(plan.slots) > 1
    queue = CellQueue(expected_work_first(cells) if shared else cells)
    progress = Progress(len(cells))
    if shared:
        layout.local_logs_dir.mkdir(parents=True, exist_ok=True)
    threads = [threading.Thread(target=_slot_loop, daemon=True, name=f"slot-{slot.index}",
                                args=(exp, layout, slot, plan.packed, queue, progress, config, cell_worker, runner,
                                      worker_command))
               for slot in plan.slots]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # join in steps so that Ctrl-C reaches this thread
            thread.join(timeout=0.5)


def slot_log(layout: RunLayout, slot: Slot) -> Path:
    return layout.local_logs_dir / f"slot{slot.index}.log"


def _slot_loop(exp: Experiment, layout: RunLayout, slot: Slot, packed: bool, queue: CellQueue, progress: Progress,
               config: list[str], cell_worker: bool, runner: Runner,
               worker_command: Callable[[Launch], list[str]]) -> None:
    shared = slot.count > 1
    log = slot_log(layout, slot) if shared else None
    env = os.environ.copy() | slot.env()
    with ExitStack() as stack:
        out = stack.enter_context(log.open("a")) if log is not None else None
        worker: WorkerProcess | None = None
        while (cell := queue.take()) is not None:
            launch = cell_launch(exp, [cell.method], packed=packed)
            progress.start(cell, slot, shared)
            start = time.time()
            if runs_in_worker(launch, cell_worker):
                if worker is None:
                    command = worker_command(launch)
                    print(f"[launch] cell worker of {slot.describe()}: {launch.describe()}", file=out, flush=True)
                    print(f"$ {' '.join(command)}", file=out, flush=True)
                    worker = WorkerProcess(command, env, out)
                if worker.run(cell) is None:  # it died: this cell failed; a new worker takes the next
                    code = worker.close()
                    print(f"!!! the cell worker of {slot.describe()} exited with code {code} during {cell.id}",
                          flush=True)
                    worker = None
            else:
                if worker is not None:
                    worker.close()
                    worker = None
                runner(launch, ["sweep", "cell", *config, "--cell", cell.id], f"cell {cell.id}", slot.env(), out)
            progress.end(cell, slot, layout.cell_result(cell.id).is_file(), time.time() - start, log)
        if worker is not None:
            worker.close()
