"""Where everything of one experiment lives on disk (one run directory, shared storage).

Nothing here is shared and mutable between cells: each cell writes only below its own
directory, so many array tasks can run at once against one run directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def experiment_file(self) -> Path:
        return self.root / "experiment.yaml"

    @property
    def plan_file(self) -> Path:
        return self.root / "plan.json"

    @property
    def warmup_dir(self) -> Path:
        return self.warmup_home()

    @property
    def warmup_adapter(self) -> Path:
        return self.warmup_dir / "adapter"

    @property
    def warmup_result(self) -> Path:
        return self.warmup_dir / "result.json"

    def warmup_home(self, key: str = "warmup") -> Path:
        """A warm-up's directory: `warmup/` for an experiment's single one (as before the axes), else
        `warmups/<key>/` (key = name, `+lora_init` unless PEFT's default; sweep/grid.WarmupRun)."""
        return self.root / "warmup" if key == "warmup" else self.root / "warmups" / key

    def warmup_adapter_of(self, key: str) -> Path:
        return self.warmup_home(key) / "adapter"

    def warmup_result_of(self, key: str) -> Path:
        return self.warmup_home(key) / "result.json"

    def cell_dir(self, cell_id: str) -> Path:
        return self.root / "cells" / cell_id

    def cell_adapter(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / "adapter"

    def cell_subset(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / "subset.json"

    def cell_checkpoints(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / "checkpoints"

    def cell_predictions(self, cell_id: str, suite: str) -> Path:
        return self.cell_dir(cell_id) / "predictions" / f"{suite}.jsonl"

    def cell_result(self, cell_id: str) -> Path:
        return self.cell_dir(cell_id) / "result.json"

    def cell_lock(self, cell_id: str) -> Path:
        """The claim of whoever runs the cell (sweep/claims.py), outside its folder: probing a cell that
        never ran creates no cell folder."""
        return self.root / "locks" / "cells" / f"{cell_id}.lock"

    def warmup_lock(self, key: str) -> Path:
        return self.root / "locks" / "warmups" / f"{key}.lock"

    def validation_file(self, task: str) -> Path:
        """The task's validation split: source row ids and checksum (data/validation.py)."""
        return self.root / "validation" / f"{task}.json"

    def tuning_file(self, group: str) -> Path:
        """One tuned arm's choice: validation scores per setting and the setting chosen (sweep/tuning.py)."""
        return self.root / "tuning" / f"{group}.json"

    @property
    def cells_dir(self) -> Path:
        return self.root / "cells"

    @property
    def slurm_dir(self) -> Path:
        return self.root / "slurm"

    @property
    def local_logs_dir(self) -> Path:
        """Logs of the local executor's slots when several run at once (one file per slot, appended)."""
        return self.root / "logs"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def eval_dir(self, name: str) -> Path:
        """Predictions of `d2lora eval` on an adapter (or "base") outside any cell."""
        return self.root / "eval" / name

    @property
    def wandb_dir(self) -> Path:
        return self.root / "wandb"
