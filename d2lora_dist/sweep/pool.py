"""Run a queue of warm-ups and cells on the slots of one machine: whichever slot is free takes the next job.

A slot runs cells launched as one plain process in a cell worker it keeps (sweep/worker.py: the base
model loads once per slot), fed one cell id at a time on stdin; any other cell (`accelerate launch`,
several ranks, or the worker switched off) is a launch of its own in that slot. A worker that exits
before it takes a cell is replaced and the cell goes to the new one; a worker that dies during a cell
fails that cell alone. Warm-ups that fit a slot run in one (sweep/local.py decides), first in the queue:
the cells that start from a warm-up wait for it, the others run beside it, and the cells of a warm-up
that failed are held back. With one slot the launches write to this terminal as they always did; with
several, each slot appends to its own log file and the terminal shows which job starts and ends where.
Ctrl-C (or an error in a slot) stops every slot: no new job starts, and the running launches are
terminated before the sweep exits. A job that failed on a full disk (the worker says so, or the run
directory's file system is found full) halts the queue instead: the running jobs end as they do, no new
one starts (each would fail the same way), and the sweep ends with one line (DiskFull) naming the path,
the failed cells and those not started; a rerun after freeing space finishes them.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from d2lora_dist.config import Experiment
from d2lora_dist.fileio import DiskFull, full_disk, suppress_no_space
from d2lora_dist.layout import RunLayout
from d2lora_dist.methods import get_method
from d2lora_dist.strategy import Launch, cell_launch, warmup_launch
from d2lora_dist.sweep.claims import EXIT_BUSY, held_elsewhere
from d2lora_dist.sweep.claims import POLL_S as CLAIM_POLL_S
from d2lora_dist.sweep.grid import Cell, WarmupRun, selection_cells
from d2lora_dist.sweep.slots import Slot, SlotPlan
from d2lora_dist.sweep.worker import BUSY, FULL, REPORT_FD_ENV


class Stopping(RuntimeError):
    """The sweep is stopping (Ctrl-C, or another slot's error): no launch starts."""


@dataclass
class Children:
    """Every process the slots started and that still runs, to stop them all at once."""

    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: set[subprocess.Popen] = field(default_factory=set)

    def start(self, command: list[str], **kwargs) -> subprocess.Popen:
        with self.lock:
            if self.stop.is_set():
                raise Stopping("the sweep is stopping")
            process = subprocess.Popen(command, **kwargs)
            self.running.add(process)
            return process

    def wait(self, process: subprocess.Popen) -> int:
        code = process.wait()
        with self.lock:
            self.running.discard(process)
        return code

    def stop_all(self, grace_s: float = 10.0) -> None:
        with self.lock:
            self.stop.set()
            running = list(self.running)
        for process in running:
            process.terminate()
        deadline = time.time() + grace_s
        for process in running:
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.kill()


# How a launch is run: (launch, CLI arguments, what it is, the slot it runs in, output file or None,
# the registry its process goes in) -> exit code
Runner = Callable[[Launch, list[str], str, Slot, "IO[str] | None", Children], int]


@dataclass
class Progress:
    """Cells started and ended, and anything else the slots say, printed under one lock."""

    total: int
    started: int = 0
    ended: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def say(self, text: str) -> None:
        with self.lock:
            print(text, flush=True)

    def drop(self, cells: int) -> None:
        """Cells that will not run (held back by a failed warm-up) leave the count."""
        with self.lock:
            self.total -= cells

    def start(self, cell: Cell, slot: Slot) -> None:
        with self.lock:
            self.started += 1
            where = f" on {slot.describe()}" if slot.count > 1 else ""
            print(f"=== cell {self.started}/{self.total}: {cell.id}{where}", flush=True)

    def not_started(self, cell: Cell, slot: Slot, holder: str) -> None:
        """The cell turned out to be another run's: it did not start here after all."""
        with self.lock:
            self.started -= 1
            print(f"[{slot.describe()}] {cell.id}: another run is on it ({holder}); coming back to it later",
                  flush=True)

    def end(self, cell: Cell, slot: Slot, ok: bool, seconds: float, log: Path | None, why: str | None = None) -> None:
        with self.lock:
            self.ended += 1
            where = f" (log: {log})" if log is not None and not ok else ""
            print(f"[{slot.describe()}] {cell.id} {'done' if ok else 'FAILED'} in {seconds:.0f}s; "
                  f"{self.ended}/{self.total} ended{f': {why}' if why else ''}{where}", flush=True)


def _nobody_else(cell: Cell) -> str | None:
    return None


def _not_done(cell: Cell) -> bool:
    return False


def _no_cells(cell: Cell) -> list[str]:
    return []


class JobQueue:
    """The warm-ups, then the cells, in order. A cell that starts from a warm-up still to end waits for it (a
    free slot takes the next cell that can run instead); the cells of a warm-up that failed are held back.

    Another run on the same run directory (sweep/claims.py): a cell it is on (`elsewhere` names who) is left
    for later, and a free slot takes the next one; a cell it has finished (`done`) leaves the queue; when only
    such cells are left, the slots wait for them, and take over any that the other run leaves undone.

    A cell may also wait for other cells (`after`: the ids of a final tuned cell's selection cells): it starts
    once those of them in this queue have ended (`cell_ended`), and is held back when one of them failed."""

    def __init__(self, warmups: list[WarmupRun], cells: list[Cell], stop: threading.Event,
                 elsewhere: Callable[[Cell], str | None] = _nobody_else, done: Callable[[Cell], bool] = _not_done,
                 say: Callable[[str], None] = print, after: Callable[[Cell], list[str]] = _no_cells) -> None:
        self._jobs: list[WarmupRun | Cell] = [*warmups, *cells]
        self._unfinished = set(warmups)
        self._after = after
        self._open = {c.id for c in cells}  # cells of this queue that have not ended
        self._changed = threading.Condition()
        self._stop = stop
        self._elsewhere, self._done, self._say = elsewhere, done, say
        self._said: set[Cell] = set()
        self.held_back: list[Cell] = []
        self.done_elsewhere: list[Cell] = []
        self.halted: str | None = None  # why no new job starts (a full disk), while running ones finish

    def halt(self, why: str) -> None:
        """No job starts any more; the running ones end as they do. The first reason is kept."""
        with self._changed:
            self.halted = self.halted or why
            self._changed.notify_all()

    def left(self) -> list[WarmupRun | Cell]:
        with self._changed:
            return list(self._jobs)

    def take(self) -> WarmupRun | Cell | None:
        """The next job that can start, waiting while only cells of running warm-ups, or cells another run is
        on, are left; None at the end."""
        with self._changed:
            while self._jobs and not self._stop.is_set() and self.halted is None:
                job, waits_elsewhere = self._next()
                if job is not None:
                    return job
                # a warm-up is running (its end notifies), or another run is on the rest; the timeout notices
                # a stop, and how far the other run got
                self._changed.wait(timeout=CLAIM_POLL_S if waits_elsewhere else 0.5)
            return None

    def _next(self) -> tuple[WarmupRun | Cell | None, bool]:
        waits_elsewhere = False
        for job in list(self._jobs):
            if isinstance(job, WarmupRun):
                self._jobs.remove(job)
                return job, False
            if job.warmup_run in self._unfinished or any(i in self._open for i in self._after(job)):
                continue
            holder = self._elsewhere(job)
            if holder is not None:
                waits_elsewhere = True
                if job not in self._said:
                    self._said.add(job)
                    self._say(f"[{job.id}] another run is on it ({holder}); coming back to it later")
                continue
            self._jobs.remove(job)
            if not self._done(job):
                return job, False
            self._open.discard(job.id)
            self.done_elsewhere.append(job)
            self._say(f"[{job.id}] done by another run")
        return None, waits_elsewhere

    def put_back(self, cell: Cell) -> None:
        """A cell that turned out to be another run's (it took the claim first): back in the queue, for later."""
        with self._changed:
            self._jobs.append(cell)
            self._changed.notify_all()

    def warmup_ended(self, run: WarmupRun, ok: bool) -> list[Cell]:
        """Its cells can start, or (failed) are held back: returns those held back."""
        with self._changed:
            self._unfinished.discard(run)
            held = [] if ok else self._hold([j for j in self._jobs if isinstance(j, Cell) and j.warmup_run == run])
            self._changed.notify_all()
            return held

    def cell_ended(self, cell: Cell, ok: bool) -> list[Cell]:
        """The cells waiting for it can start, or (failed) are held back: returns those held back."""
        with self._changed:
            self._open.discard(cell.id)
            held = [] if ok else self._hold([], cell)
            self._changed.notify_all()
            return held

    def _hold(self, cells: list[Cell], failed: Cell | None = None) -> list[Cell]:
        """Hold back `cells` and every queued cell that waits for them or for `failed`, on and on."""
        held: list[Cell] = []
        ended = {failed.id} if failed is not None else set()
        while True:
            ended |= {c.id for c in cells}
            held += cells
            self._jobs = [j for j in self._jobs if j not in cells]
            self._open -= {c.id for c in cells}
            cells = [j for j in self._jobs if isinstance(j, Cell) and ended & set(self._after(j))]
            if not cells:
                break
        self.held_back += held
        return held


NOT_TAKEN = "not taken"


class WorkerProcess:
    """A `sweep worker --cells-from-stdin` of one slot: give it a cell, wait for its report."""

    def __init__(self, children: Children, command: list[str], env: dict[str, str], out: IO[str] | None) -> None:
        self.children = children
        read, write = os.pipe()
        try:
            self.process = children.start(command, stdin=subprocess.PIPE, stdout=out,
                                          stderr=subprocess.STDOUT if out is not None else None,
                                          env=env | {REPORT_FD_ENV: str(write)}, pass_fds=(write,), text=True)
        except BaseException:
            os.close(read)
            raise
        finally:
            os.close(write)  # the worker holds the only write end: its exit ends our reads
        self.reports = os.fdopen(read)
        self.why: str | None = None  # the last failed cell's reason, as the worker reported it

    def run(self, cell: Cell) -> str:
        """How the cell went: "ok", "failed" or "full" as the worker reports it (`why` says why), "died" when
        the worker died during it, "not taken" when the worker had exited before it took the cell (the cell
        never started)."""
        self.why = None
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(cell.id + "\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError):
            return NOT_TAKEN
        if self._report(cell) != "started":
            return NOT_TAKEN
        return self._report(cell) or "died"

    def _report(self, cell: Cell) -> str | None:
        line = self.reports.readline().rstrip("\n").split(" ", 2)
        if not line[0]:
            return None
        if line[0] != cell.id:
            raise RuntimeError(f"cell worker reported {line[0]!r} while running {cell.id!r}")
        self.why = line[2] if len(line) > 2 else None
        return line[1]

    def close(self) -> int:
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        code = self.children.wait(self.process)
        self.reports.close()
        return code


def runs_in_worker(launch: Launch, cell_worker: bool) -> bool:
    """A cell launched as one plain process runs in its slot's worker (unless the worker is off)."""
    return cell_worker and launch.accelerate_config is None


def expected_work_first(cells: list[Cell]) -> list[Cell]:
    """Cells with the most training first (a preference pair is two sequences, and a reference pass when
    the method has one), evaluation-only cells last to fill the gaps: slots then end close together."""
    def work(cell: Cell) -> int:
        if not cell.trains:
            return 0
        method = get_method(cell.method)
        return cell.n * ((2 + method.uses_reference) if method.form == "preference" else 1)

    return sorted(cells, key=lambda c: -work(c))


@dataclass(frozen=True)
class SlotRun:
    """What every slot's thread shares."""

    exp: Experiment
    layout: RunLayout
    plan: SlotPlan
    config: list[str]
    cell_worker: bool
    runner: Runner
    worker_command: Callable[[Launch], list[str]]
    queue: JobQueue
    progress: Progress
    children: Children


def run_on_slots(exp: Experiment, layout: RunLayout, cells: list[Cell], plan: SlotPlan, config: list[str],
                 cell_worker: bool, runner: Runner, worker_command: Callable[[Launch], list[str]],
                 warmups: list[WarmupRun] | None = None) -> list[Cell]:
    """`warmups`, then every cell of `cells`, on the plan's slots (in order on one slot, else cells with the most
    work first); returns the cells held back by a failed warm-up. A slot's error, or Ctrl-C, stops the others
    and is raised here."""
    children = Children()
    shared = len(plan.slots) > 1
    progress = Progress(len(cells))

    def done(cell: Cell) -> bool:
        finished = layout.cell_result(cell.id).is_file()
        if finished:
            progress.drop(1)
        return finished

    queue = JobQueue(list(warmups or []), expected_work_first(cells) if shared else cells, children.stop,
                     lambda cell: held_elsewhere(layout.cell_lock(cell.id)), done, progress.say,
                     lambda cell: [c.id for c in selection_cells(exp, cell)])
    run = SlotRun(exp, layout, plan, config, cell_worker, runner, worker_command, queue, progress, children)
    if shared:
        layout.local_logs_dir.mkdir(parents=True, exist_ok=True)
    errors: list[BaseException] = []

    def slot_thread(slot: Slot) -> None:
        try:
            _slot_loop(run, slot)
        except Stopping:
            pass
        except BaseException as e:  # stop the other slots, re-raised below
            errors.append(e)
            children.stop_all()

    threads = [threading.Thread(target=slot_thread, args=(slot,), daemon=True, name=f"slot-{slot.index}")
               for slot in plan.slots]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # join in steps so that Ctrl-C reaches this thread
                thread.join(timeout=0.5)
    except KeyboardInterrupt:
        children.stop_all()
        raise
    if errors:
        raise errors[0]
    if queue.halted:
        raise DiskFull(_halted_message(layout, queue, cells))
    return queue.held_back


def _halted_message(layout: RunLayout, queue: JobQueue, cells: list[Cell]) -> str:
    """The one line a sweep stopped by a full disk ends with: why, what failed, what did not start."""
    left = [c for c in queue.left() if isinstance(c, Cell)]
    failed = [c.id for c in cells if c not in left and c not in queue.held_back
              and not layout.cell_result(c.id).is_file()]
    return (f"the sweep stopped, {len(failed)} cell(s) failed ({', '.join(failed) or 'none'}) and "
            f"{len(left) + len(queue.held_back)} did not start: {queue.halted}")


def slot_log(layout: RunLayout, slot: Slot) -> Path:
    return layout.local_logs_dir / f"slot{slot.index}.log"


class SlotLog:
    """A slot's log file that a full disk cannot break: a line it has no room for is lost, not raised (the
    launches write to the same file through its descriptor; the terminal still says how each job ended)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = path.open("a", buffering=1)

    def write(self, text: str) -> int:
        with suppress_no_space():
            return self._file.write(text)
        return 0

    def flush(self) -> None:
        with suppress_no_space():
            self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    def __enter__(self) -> SlotLog:
        return self

    def __exit__(self, *exc: object) -> None:
        with suppress_no_space():
            self._file.close()


def _slot_loop(run: SlotRun, slot: Slot) -> None:
    log = slot_log(run.layout, slot) if slot.count > 1 else None
    with SlotLog(log) if log is not None else nullcontext() as out:
        worker: WorkerProcess | None = None
        try:
            while (job := run.queue.take()) is not None:
                launch = None if isinstance(job, WarmupRun) else cell_launch(run.exp, [job.method],
                                                                            packed=run.plan.packed)
                if worker is not None and (launch is None or not runs_in_worker(launch, run.cell_worker)):
                    worker.close()  # the next launch needs the slot's memory
                    worker = None
                if launch is None:
                    _run_warmup(run, slot, job, out, log)
                    continue
                run.progress.start(job, slot)
                start = time.time()
                why = None
                if runs_in_worker(launch, run.cell_worker):
                    worker, outcome = _run_in_worker(run, slot, job, launch, worker, out)
                    why = worker.why if worker is not None and outcome == FULL else None
                else:
                    code = run.runner(launch, ["sweep", "cell", *run.config, "--cell", job.id, "--if-busy", "skip"],
                                      f"cell {job.id}", slot, out, run.children)
                    if run.children.stop.is_set() and not run.layout.cell_result(job.id).is_file():
                        raise Stopping("the sweep is stopping")  # terminated, not failed
                    outcome = BUSY if code == EXIT_BUSY else None
                if _another_runs(run, slot, job, outcome):
                    continue
                ok = run.layout.cell_result(job.id).is_file()
                full = None if ok else _disk_full(run, why)
                run.progress.end(job, slot, ok, time.time() - start, log, full or why)
                for cell in run.queue.cell_ended(job, ok):
                    run.progress.say(f"[{cell.id}] held back: {job.id}, whose result it waits for, failed")
                if full:
                    run.queue.halt(full)
        finally:
            if worker is not None:
                worker.close()


def _another_runs(run: SlotRun, slot: Slot, cell: Cell, outcome: str | None) -> bool:
    """Whether another run took the cell's claim first (the cell said "busy"; a launch of several ranks cannot
    say it through its exit code, so a cell left without a result whose claim another process holds is
    one too): it goes back in the queue, for later."""
    if run.layout.cell_result(cell.id).is_file():
        return False
    holder = held_elsewhere(run.layout.cell_lock(cell.id))
    if outcome != BUSY and holder is None:
        return False
    run.progress.not_started(cell, slot, holder or "it held the claim")
    run.queue.put_back(cell)
    return True


def _run_in_worker(run: SlotRun, slot: Slot, cell: Cell, launch: Launch, worker: WorkerProcess | None,
                   out: IO[str] | None) -> tuple[WorkerProcess | None, str]:
    """The cell in the slot's worker (started if need be); returns the worker to keep (None after it died) and
    how the cell went (WorkerProcess.run; for "full", its `why` is the worker's line that says so)."""
    worker = worker or _start_worker(run, slot, launch, out)
    outcome = worker.run(cell)
    if outcome == NOT_TAKEN:  # it had exited between cells: the cell goes to a new worker
        code = worker.close()
        run.progress.say(f"[{slot.describe()}] the cell worker had exited (code {code}) before {cell.id}; "
                         "starting another")
        worker = _start_worker(run, slot, launch, out)
        outcome = worker.run(cell)
    if outcome not in ("died", NOT_TAKEN):
        return worker, outcome
    code = worker.close()  # this cell failed; a new worker takes the next
    if run.children.stop.is_set():
        raise Stopping("the sweep is stopping")
    when = "during" if outcome == "died" else "before it took"
    run.progress.say(f"!!! the cell worker of {slot.describe()} exited with code {code} {when} {cell.id}")
    return None, outcome


def _disk_full(run: SlotRun, why: str | None) -> str | None:
    """Why a job failed when it was the disk: the worker's own line, else (a launch of its own, a worker that
    died writing its log) the run directory's file system found (almost) full. None: some other failure."""
    return why or full_disk(run.layout.root)


def _run_warmup(run: SlotRun, slot: Slot, warmup: WarmupRun, out: IO[str] | None, log: Path | None) -> None:
    where = f" on {slot.describe()}" if slot.count > 1 else ""
    run.progress.say(f"=== warm-up {warmup.key}{where}, beside the cells that do not start from it")
    start = time.time()
    run.runner(warmup_launch(run.exp, name=warmup.name), ["warmup", *run.config, "--warmup", warmup.key],
               f"warm-up {warmup.key}", slot, out, run.children)
    ok = run.layout.warmup_result_of(warmup.key).is_file()
    if not ok and run.children.stop.is_set():  # stopped, not failed: its cells are not held back
        raise Stopping("the sweep is stopping")
    held = run.queue.warmup_ended(warmup, ok)
    run.progress.drop(len(held))
    if ok:
        run.progress.say(f"[{slot.describe()}] warm-up {warmup.key} done in {time.time() - start:.0f}s")
        return
    full = _disk_full(run, None)
    run.progress.say(f"!!! warm-up {warmup.key} failed{f': {full}' if full else ''}{f' (log: {log})' if log else ''}; "
                     f"its {len(held)} cell(s) are held back")
    if full:
        run.queue.halt(full)


def _start_worker(run: SlotRun, slot: Slot, launch: Launch, out: IO[str] | None) -> WorkerProcess:
    command = run.worker_command(launch)
    print(f"[launch] cell worker of {slot.describe()}: {launch.describe()}", file=out, flush=True)
    print(f"$ {' '.join(command)}", file=out, flush=True)
    return WorkerProcess(run.children, command, os.environ.copy() | slot.env(launch.num_processes), out)
