"""A task's validation split: rows of its training pool that no cell trains on and no test suite reads.

They are the `validation` positions after the holdout in the one permutation the experiment's
`data_seed` draws (data/subsets.py): the same rows for every cell and seed, disjoint from the
holdout (the test items of a task without a test dataset) by construction, and excluded from every
training subset, which draws from the rows after both. A task whose test items come from another
dataset (GSM8K's test split) holds them out of its training split all the same.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from d2lora_dist.data.loading import DataError
from d2lora_dist.data.subsets import permutation
from d2lora_dist.fileio import read_json, write_json_atomic


def validation_indices(total_rows: int, data_seed: int, holdout: int, validation: int) -> list[int]:
    """Source row ids of the validation split: the positions after the holdout in data_seed's permutation."""
    return permutation(total_rows, data_seed)[holdout:holdout + validation]


def validation_record(dataset: str, source: str, data_seed: int, holdout: int, validation: int,
                      indices: list[int], usable: list[int], ids: list[str]) -> dict[str, Any]:
    """What <run>/validation/<task>.json holds: the rows drawn (source row numbers), those evaluated (usable:
    valid in eval form) and their ids."""
    payload = json.dumps([dataset, source, indices]).encode()
    return {"dataset": dataset, "source": source, "data_seed": data_seed, "holdout": holdout,
            "validation": validation, "indices": indices, "usable_indices": usable, "ids": ids,
            "sha256": hashlib.sha256(payload).hexdigest()}


def save_validation(path: Path, record: dict[str, Any]) -> None:
    """Written once per run directory (by the main process); a later cell that draws other rows means the
    task data changed."""
    saved = read_json(path) if path.is_file() else None
    if saved is not None and saved["sha256"] != record["sha256"]:
        raise DataError(f"the task data changed since the validation split was drawn: {path} records other rows; "
                        "move the run directory away to start again")
    if saved != record:
        write_json_atomic(path, record)
