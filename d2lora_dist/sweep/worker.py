"""The cell worker: one plain process runs several cells on one loaded base model.

Used by the local executor (sweep/local.py) for cells whose launch is one plain process (the CPU
default, DDP on one GPU). Each cell gets what a process of its own would give it: its preflight, a
fresh LoRA attached to the shared base (base_cache.SharedBase, given back pristine and checked), a
fresh trainer and optimizer, its seed set where train_phase sets it, evaluation on the same base,
and result.json written last by run_cell. A failing cell is reported and the next one runs.
Multi-rank launches and Slurm array tasks run one cell per process (sweep cell).
"""

from __future__ import annotations

import time
import traceback

from d2lora_dist import distributed, tracking
from d2lora_dist.base_cache import SharedBase
from d2lora_dist.config import Experiment
from d2lora_dist.layout import RunLayout
from d2lora_dist.preflight import for_cells, preflight
from d2lora_dist.sweep.cell import run_cell
from d2lora_dist.sweep.grid import Cell


def run_cells(exp: Experiment, layout: RunLayout, cells: list[Cell], source: str,
              models: SharedBase | None = None) -> list[str]:
    """Run the cells one after another on one shared base; returns the ids of those that failed."""
    models = models or SharedBase()
    failed = []
    for i, cell in enumerate(cells, 1):
        print(f"=== worker cell {i}/{len(cells)}: {cell.id}", flush=True)
        start = time.time()
        try:
            preflight(exp, for_cells(exp, [cell], distributed.world_size(), None), source)
            run_cell(exp, layout, cell, models=models)
        except Exception:  # the cell's own failure: reported, and the worker goes on with the next
            traceback.print_exc()
            print(f"!!! cell {cell.id} failed in the worker", flush=True)
            failed.append(cell.id)
            tracking.finish_open_run(exit_code=1)
            distributed.release_training_state()
        print(f"[worker] {cell.id}: {time.time() - start:.1f}s; base model loaded {models.loads} time(s) "
              f"for {i} cell(s)", flush=True)
    return failed
