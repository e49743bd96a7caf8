"""Slots: the shares of one machine on which the local executor runs cells at the same time.

On GPUs a slot is a group of devices (its launches see only them, through CUDA_VISIBLE_DEVICES), as
many as the most demanding cell needs (strategy.cell_launch, packed): on an 8-GPU box whose cells each
fit one GPU, eight cells run at once instead of one after another. On CPUs a slot is a share of the
cores (OMP_NUM_THREADS / MKL_NUM_THREADS), bounded by the memory a cell needs: a decoding step of a
small model does not keep two threads busy, so two one-thread slots on two cores get more done than one
two-thread process (docs/performance.md).

On CPUs, which slot a cell runs in and how many run beside it change nothing in what it trains: each
cell seeds itself and sees the same data and model, and its adapter is bit-identical for 1 and 2
slots (tests/test_sweep_slots.py; a thread count can move the last bit of a float sum in evaluation).
On GPUs, several slots give each cell the fewest GPUs that hold it, the launch a Slurm array task
gets, instead of all ranks: another world size, recorded in the adapter's manifest. result.json
records the slot and thread count a cell ran with. Where cells run is a flag of `sweep run`
(`--slots`), not an experiment setting (docs/choices.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from d2lora_dist.errors import InputError

SLOT_ENV = "D2LORA_SLOT"  # "index/count" of the slot a launch runs in, recorded in result.json
MEMORY_HEADROOM = 0.9  # of the free memory that slots may plan to use on a CPU machine


@dataclass(frozen=True)
class Machine:
    """What slots are cut from: CPU cores, visible GPUs (ids as CUDA_VISIBLE_DEVICES names them), free RAM,
    and whether the user set the thread count (OMP_NUM_THREADS), which slots then keep."""

    cores: int
    gpus: tuple[str, ...]
    free_gib: float
    threads_set: bool = False

    @classmethod
    def here(cls) -> Machine:
        import psutil

        return cls(len(os.sched_getaffinity(0)), visible_gpus(), psutil.virtual_memory().available / 2**30,
                   "OMP_NUM_THREADS" in os.environ)


def visible_gpus() -> tuple[str, ...]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else every device torch counts."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return tuple(d.strip() for d in named.split(",") if d.strip() and d.strip() != "-1")
    import torch

    return tuple(str(i) for i in range(torch.cuda.device_count())) if torch.cuda.is_available() else ()


@dataclass(frozen=True)
class Slot:
    index: int
    count: int
    threads: int | None  # per rank; None = as the user set them (OMP_NUM_THREADS)
    devices: tuple[str, ...] | None  # None on a CPU machine

    def env(self, ranks: int = 1) -> dict[str, str]:
        """The environment of a launch of `ranks` ranks in this slot: it sees only the GPUs it uses (a plain
        process that saw two would train with DataParallel on twice the batch)."""
        env = {SLOT_ENV: f"{self.index}/{self.count}"}
        if self.threads is not None:
            env |= {"OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
        if self.devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self.devices[:ranks] if ranks <= len(self.devices) else self.devices)
        return env

    def describe(self) -> str:
        where = f"GPU {','.join(self.devices)}" if self.devices else ""
        threads = f"{self.threads} thread{'s' if self.threads > 1 else ''}" if self.threads else ""
        return f"slot {self.index} ({', '.join(x for x in (where, threads) if x) or 'as set'})"


@dataclass(frozen=True)
class SlotPlan:
    slots: tuple[Slot, ...]
    packed: bool  # cells launch on the fewest GPUs that hold them (several GPU slots), not on all ranks
    reason: str


def plan_slots(requested: int | None, machine: Machine, cells: int, ranks_per_cell: int,
               cell_gib: float | None) -> SlotPlan:
    """How many cells run at once, on what. `requested`: None = as many as fit (`--slots auto`).
    `ranks_per_cell`: the most GPUs (or CPU ranks) one cell's launch takes; `cell_gib`: the memory one
    rank of a cell needs (its estimate; None when there is none: a named accelerate config, an unknown
    model shape, and then `auto` is one slot)."""
    if requested is not None and requested < 1:
        raise InputError(f"--slots: {requested} is not a number of slots (1 or more, or auto)")
    if machine.gpus:
        return _gpu_slots(requested, machine, cells, ranks_per_cell, cell_gib is not None)
    return _cpu_slots(requested, machine, cells, ranks_per_cell, cell_gib)


def _threads(machine: Machine, processes: int) -> int | None:
    return None if machine.threads_set else max(1, machine.cores // processes)


def _gpu_slots(requested: int | None, machine: Machine, cells: int, per_cell: int, estimated: bool) -> SlotPlan:
    fit = len(machine.gpus) // per_cell
    why = f"{len(machine.gpus)} GPU(s), {per_cell} per cell (the largest cell's launch), {cells} cell(s) to run"
    if requested is not None and requested > 1 and not estimated:
        raise InputError(f"--slots {requested}: cells launch as configured (launch.accelerate_config, which may "
                         "name its own GPUs); set launch.strategy so that each slot's GPUs are known")
    if requested is not None and requested > max(fit, 1):
        raise InputError(f"--slots {requested}: {len(machine.gpus)} visible GPU(s) hold at most {max(fit, 1)} "
                         f"slot(s) of the {per_cell} GPU(s) the largest cell needs")
    count = max(1, min(requested, cells)) if requested else (max(1, min(fit, cells)) if estimated else 1)
    if count == 1:  # every cell on all launch.num_processes ranks, one after another
        why += "" if estimated else "; no memory estimate (launch as configured)"
        return SlotPlan((Slot(0, 1, _threads(machine, max(per_cell, 1)), machine.gpus),), False, f"1 slot: {why}")
    slots = tuple(Slot(i, count, _threads(machine, count * per_cell), machine.gpus[i * per_cell:(i + 1) * per_cell])
                  for i in range(count))
    return SlotPlan(slots, True, f"{count} slots of {per_cell} GPU(s): {why}")


def _cpu_slots(requested: int | None, machine: Machine, cells: int, ranks: int, rank_gib: float | None) -> SlotPlan:
    by_cores = max(1, machine.cores // ranks)
    cell_gib = rank_gib * ranks if rank_gib else None
    by_memory = int(machine.free_gib * MEMORY_HEADROOM // cell_gib) if cell_gib else None
    memory = (f", {cell_gib:.1f} GiB per cell of {machine.free_gib:.1f} GiB free" if cell_gib
              else ", no memory estimate (launch as configured, or the model's shape unknown): one slot unless asked")
    why = f"{machine.cores} CPU core(s), {ranks} rank(s) per cell, {cells} cell(s) to run{memory}"
    if requested is not None:
        if requested > by_cores:
            raise InputError(f"--slots {requested}: {why}; at most {by_cores} slot(s) (more than one thread per "
                             "core slows every slot down)")
        if by_memory is not None and requested > max(by_memory, 1):
            raise InputError(f"--slots {requested}: {why}; the memory holds at most {max(by_memory, 1)} slot(s)")
    if requested:
        count = max(1, min(requested, cells))  # one slot even with no cell left: nothing divides by zero
    else:
        count = max(1, min(by_cores, by_memory, cells)) if by_memory is not None else 1
    threads = _threads(machine, count * ranks)
    slots = tuple(Slot(i, count, threads, None) for i in range(count))
    per = f"{threads} thread(s) per rank" if threads else "the threads you set"
    return SlotPlan(slots, False, f"{count} slot(s) of {per}: {why}")


def slot_record() -> dict[str, object]:
    """The slot this process runs in and the threads torch uses, for result.json."""
    import torch

    return {"slot": os.environ.get(SLOT_ENV, "0/1"), "torch_threads": torch.get_num_threads(),
            "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
