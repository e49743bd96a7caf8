"""The cell worker: one plain process runs several cells on one loaded base model.

Used by the local executor (sweep/local.py) for cells whose launch is one plain process (the CPU
default, DDP on one GPU). Each cell gets what a process of its own would give it: its preflight, a
fresh LoRA attached to the shared base (base_cache.SharedBase, given back pristine and checked), a
fresh trainer and optimizer, its seed set where train_phase sets it, evaluation on the same base,
and result.json written last by run_cell. A failing cell is reported and the next one runs.
Multi-rank launches and Slurm array tasks run one cell per process (sweep cell).

A worker is given its cells either all at once (`--cells`) or one at a time on stdin (`--cells-from
-stdin`, what the executor's slots use, so that whichever slot is free takes the next cell); it then
reports on the file descriptor named by REPORT_FD_ENV that it took each cell (`<id> started`) and how
the cell ended (`<id> ok`, `<id> busy`: another process runs it, sweep/claims.py, or `<id> failed|full
<why, one line>`; `full`: the disk was full), so that the
executor can tell a worker that died during a cell from one that had exited before it took one.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Iterable

from d2lora_dist import distributed, tracking
from d2lora_dist.base_cache import SharedBase
from d2lora_dist.config import Experiment
from d2lora_dist.fileio import DiskFull, suppress_no_space
from d2lora_dist.layout import RunLayout
from d2lora_dist.preflight import for_cells, preflight
from d2lora_dist.sweep.cell import run_cell
from d2lora_dist.sweep.claims import Busy
from d2lora_dist.sweep.grid import Cell, find_cell

REPORT_FD_ENV = "D2LORA_WORKER_REPORT_FD"
OK, FAILED, FULL, BUSY = "ok", "failed", "full", "busy"  # how a cell ended, as reported (FULL: no space
# left on the disk; BUSY: another process runs it)


def run_one(exp: Experiment, layout: RunLayout, cell: Cell, source: str, models: SharedBase,
            count: int) -> tuple[str, str | None]:
    """One cell on the shared base, the worker's `count`-th: ("ok", None), ("busy", None) when another process
    runs it (skipped at once: the executor comes back to it later), or ("failed" | "full", why in one line)
    after reporting it. "full": the disk was full (that line alone); any other failure also prints its
    traceback."""
    start = time.time()
    outcome, failure = OK, None
    try:
        preflight(exp, for_cells(exp, [cell], distributed.world_size(), None), source)
        run_cell(exp, layout, cell, models=models, wait=False)
    except Busy as e:
        _say(f"{e}; skipped")
        return BUSY, None
    except DiskFull as e:
        outcome, failure = FULL, str(e)
    except Exception as e:  # the cell's own failure: reported, and the worker goes on with the next
        outcome, failure = FAILED, (f"{type(e).__name__}: {e}".splitlines() or [""])[0]
        _say(traceback.format_exc().rstrip())
    if failure is not None:
        _say(f"!!! cell {cell.id} failed in the worker: {failure}")
        tracking.finish_open_run(exit_code=1)
        distributed.release_training_state()
    _say(f"[worker] {cell.id}: {time.time() - start:.1f}s; base model loaded {models.loads} time(s) "
         f"for {count} cell(s)")
    return outcome, failure


def _say(text: str) -> None:
    """Print to the log; on a full disk the line is lost, but the worker lives to report the cell."""
    with suppress_no_space():
        print(text, flush=True)


def run_cells(exp: Experiment, layout: RunLayout, cells: list[Cell], source: str,
              models: SharedBase | None = None) -> list[str]:
    """Run the cells one after another on one shared base; returns the ids of those that failed."""
    models = models or SharedBase()
    failed = []
    for i, cell in enumerate(cells, 1):
        _say(f"=== worker cell {i}/{len(cells)}: {cell.id}")
        if run_one(exp, layout, cell, source, models, i)[0] in (FAILED, FULL):
            failed.append(cell.id)
    return failed


def serve_cells(exp: Experiment, layout: RunLayout, cell_ids: Iterable[str], source: str) -> list[str]:
    """Run each cell id as it arrives (one per line), reporting `<id> ok|failed|busy` after each."""
    models = SharedBase()
    report = None
    if REPORT_FD_ENV in os.environ:  # ours alone: no process this worker starts may hold it open
        fd = int(os.environ.pop(REPORT_FD_ENV))
        os.set_inheritable(fd, False)
        report = os.fdopen(fd, "w", buffering=1)
    failed = []
    count = 0
    for line in cell_ids:
        if not line.strip():
            continue
        cell = find_cell(exp, line.strip())
        if report is not None:
            report.write(f"{cell.id} started\n")
        count += 1
        _say(f"=== worker cell {count}: {cell.id}")
        outcome, failure = run_one(exp, layout, cell, source, models, count)
        failed += [cell.id] if outcome in (FAILED, FULL) else []
        if report is not None:
            report.write(f"{cell.id} {outcome}{f' {failure}' if failure else ''}\n")
    return failed
