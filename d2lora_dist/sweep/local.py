"""The local executor: the warm-ups the cells need, every unfinished cell, then (in entries) the report.

A warm-up that fails holds back only the cells that start from it; the others run. With several slots,
a warm-up whose launch fits a slot runs in one while the other slots run the cells that do not start
from it (vanilla LoRA, other warm-ups' cells); a warm-up that needs more than a slot (all of a GPU box's
ranks) runs first, on the whole machine.

Cells run on the machine's slots (sweep/slots.py): several at once when the machine holds several
(GPU groups, or shares of the CPU cores), each slot taking the next cell when it is free
(sweep/pool.py). Cells whose launch is one plain process (the CPU default, DDP on one GPU) run in a
cell worker per slot: one process that loads the base model once and runs cell after cell
(sweep/worker.py), so each pays for neither the imports nor the model load again. Every other cell
(`accelerate launch`, DeepSpeed, several ranks) runs as its own launch, so memory is returned between
cells. A failing cell is named and the sweep goes on, except on a full disk, where no new job starts
(sweep/pool.py); `cell_worker=False` gives every cell its own process.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from d2lora_dist.config import Experiment
from d2lora_dist.fileio import DiskFull, full_disk
from d2lora_dist.layout import RunLayout
from d2lora_dist.memory_estimate import GIB
from d2lora_dist.shipped import for_command
from d2lora_dist.strategy import Launch, cell_launch, warmup_launch
from d2lora_dist.sweep.claims import EXIT_BUSY
from d2lora_dist.sweep.grid import Cell, WarmupRun, warmup_runs
from d2lora_dist.sweep.pool import Children, run_on_slots
from d2lora_dist.sweep.slots import Machine, Slot, SlotPlan, plan_slots


class LaunchFailed(RuntimeError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


_HANDED_OUT: set[int] = set()
_HANDED_OUT_LOCK = threading.Lock()


def free_port() -> int:
    """A port nothing listens on now and that this sweep has not handed out before: two slots that start
    `accelerate launch` at the same moment could otherwise be given the same one before either binds it."""
    with _HANDED_OUT_LOCK:
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port


def launch_command(exp: Experiment, launch: Launch, cli_args: list[str], port_offset: int = 0) -> list[str]:
    """`accelerate launch ... -m d2lora_dist.cli ARGS`, or plain Python for one process."""
    module = ["-m", "d2lora_dist.cli", *cli_args]
    if launch.accelerate_config is None:
        return [sys.executable, *module]
    port = exp.launch.main_process_port + port_offset if exp.launch.main_process_port else free_port()
    config = for_command(launch.accelerate_config)  # the user's file as given, else the shipped copy
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *launch.accelerate_flags(),
            "--num_processes", str(launch.num_processes), "--main_process_port", str(port), *module]


def run_launch(exp: Experiment, launch: Launch, cli_args: list[str], what: str, slot: Slot | None = None,
               out: IO[str] | None = None, children: Children | None = None) -> None:
    """Run one launch to its end (in `slot`: its GPUs, threads and port offset; output to `out`, else here;
    registered with the slots' `children`, so that stopping the sweep stops it)."""
    command = launch_command(exp, launch, cli_args, port_offset=slot.index if slot else 0)
    print(f"[launch] {what}: {launch.describe()}", file=out, flush=True)
    print(f"$ {' '.join(command)}", file=out, flush=True)
    env = slot.env(launch.num_processes) if slot else {}
    options = {"env": os.environ.copy() | env, "stdout": out,
               "stderr": subprocess.STDOUT if out is not None else None}
    code = children.wait(children.start(command, **options)) if children else subprocess.call(command, **options)
    if code != 0:
        raise LaunchFailed(f"{what} failed with exit code {code} (command: {' '.join(command)})", code)


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
            full = full_disk(layout.root)
            if full:  # every launch after it would fail the same way
                raise DiskFull(f"the sweep stopped: warm-up {run.key} failed: {full}") from e
            print(f"!!! {e}; its cells are held back", flush=True)
            failed.add(run)
    return failed


def slot_plan(exp: Experiment, cells: list[Cell], slots: int | None, machine: Machine | None = None,
              warmups: list[WarmupRun] | None = None) -> SlotPlan:
    """The slots these cells run on: `slots` of them, or (None) as many as the machine holds. On a CPU machine
    the `warmups` still to train are sized in too, as they run in a slot beside the cells (GPU slots are
    sized by the cells alone, and a warm-up runs in one only when it fits: warmups_in_slots)."""
    machine = machine or Machine.here()
    launches = [cell_launch(exp, [m], packed=bool(machine.gpus)) for m in sorted({c.method for c in cells})]
    if not machine.gpus:
        launches += [warmup_launch(exp, name=run.name) for run in warmups or []]
    ranks = max((launch.num_processes for launch in launches), default=1)
    estimated = all(launch.choice is not None for launch in launches)  # else: launched as configured
    gib = max(launch.choice.estimate.total / GIB for launch in launches) if estimated and launches else None
    return plan_slots(slots, machine, len(cells), ranks, gib)


def warmups_in_slots(exp: Experiment, plan: SlotPlan, warmups: list[WarmupRun]) -> bool:
    """Whether the warm-ups run in slots beside the cells: there are several slots, and each warm-up's launch
    has a memory estimate and needs no more GPUs than a slot has (else it runs first, on every rank)."""
    if len(plan.slots) < 2 or not warmups:
        return False
    launches = [warmup_launch(exp, name=run.name) for run in warmups]
    gpus = len(plan.slots[0].devices) if plan.slots[0].devices is not None else None
    return all(launch.choice is not None and (gpus is None or launch.num_processes <= gpus) for launch in launches)


def pending_warmups(layout: RunLayout, cells: list[Cell]) -> list[WarmupRun]:
    """The warm-ups these cells start from that are not trained yet."""
    return [run for run in warmup_runs(cells) if not layout.warmup_result_of(run.key).is_file()]


def describe_here(exp: Experiment, layout: RunLayout, cells: list[Cell]) -> str:
    """What `sweep run` would do with these cells on this machine: its slots, where the warm-ups run, and each
    method's launch."""
    if not cells:
        return "nothing left to run"
    warmups = pending_warmups(layout, cells)
    plan = slot_plan(exp, cells, None, warmups=warmups)
    launches = {m: cell_launch(exp, [m], packed=plan.packed) for m in sorted({c.method for c in cells})}
    beside = "; the warm-ups in slots beside the cells" if warmups_in_slots(exp, plan, warmups) else ""
    return f"{plan.reason}{beside}; " + "; ".join(f"{m}: {launch.short()}" for m, launch in launches.items())


def run_sweep(exp: Experiment, layout: RunLayout, cells: list[Cell], experiment_file: Path,
              cell_worker: bool = True, slots: int | None = None) -> list[str]:
    """Run what is not done; returns the ids of cells that failed (the sweep goes on past them).
    `slots`: how many jobs run at once (None: as many as the machine holds)."""
    config = ["-c", str(experiment_file)]
    todo = [c for c in cells if not layout.cell_result(c.id).is_file()]
    if not todo:  # a rerun of a finished sweep: the report is rebuilt by the caller
        print(f"{len(cells)} of {len(cells)} cells done; running 0: nothing left to run", flush=True)
        return []
    pending = pending_warmups(layout, todo)
    plan = slot_plan(exp, todo, slots, warmups=pending)
    beside = warmups_in_slots(exp, plan, pending)
    failed: list[str] = []
    if not beside:
        held_back = run_warmups(exp, layout, todo, config)
        failed = [c.id for c in todo if c.warmup_run in held_back]
        todo = [c for c in todo if c.warmup_run not in held_back]
    print(f"{len(cells) - len(todo) - len(failed)} of {len(cells)} cells done; running {len(todo)}"
          + (f"; {len(failed)} held back by a failed warm-up" if failed else "")
          + (f", and warm-up(s) {', '.join(r.key for r in pending)} beside them" if beside else ""), flush=True)
    if not todo:
        return failed
    print(f"[slots] {plan.reason}", flush=True)

    def runner(launch: Launch, cli_args: list[str], what: str, slot: Slot, out: IO[str] | None,
               children: Children) -> int:
        try:
            run_launch(exp, launch, cli_args, what, slot, out, children)
        except LaunchFailed as e:
            if e.code != EXIT_BUSY:  # busy: another run is on the cell, said by the cell and the slots
                print(f"!!! {e}", file=out, flush=True)
            return e.code
        return 0

    def worker_command(launch: Launch) -> list[str]:
        return launch_command(exp, launch, ["sweep", "worker", *config, "--cells-from-stdin"])

    held = run_on_slots(exp, layout, todo, plan, config, cell_worker, runner, worker_command,
                        pending if beside else None)
    if held:
        print(f"{len(held)} cell(s) held back by a failed warm-up or selection cell: {', '.join(c.id for c in held)}", flush=True)
    return failed + [c.id for c in todo if not layout.cell_result(c.id).is_file()]  # result.json = done
