"""Nested, seeded subsets: which rows a phase trains on, and which rows are held out.

The holdout is the first `holdout` positions of one permutation of the raw rows drawn with
the experiment's `data_seed`: the same evaluation rows for every cell. The remaining rows
are put in an order drawn from (`data_seed`, the cell's seed), and an n-subset is the first n
usable rows of that order: within one seed 1k is a prefix of 2k is a prefix of 5k, LoRA and
D2LoRA at that seed train on the same rows (the pair the report compares), and another seed
draws other rows, so seeds vary the data as well as the initialisation. The indices are
saved with the cell.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from d2lora_dist.data.loading import DataError, Normalized


@dataclass(frozen=True)
class Subset:
    dataset: str
    form: str
    source: str
    data_seed: int
    seed: int
    holdout: int
    n: int
    indices: list[int]
    # rows of the dataset the normaliser refused ({count, rows: [{row, reason}]}): not drawn, and said so
    dropped: dict[str, Any] = field(default_factory=lambda: {"count": 0, "rows": []})

    @property
    def sha256(self) -> str:
        payload = json.dumps([self.dataset, self.source, self.form, self.indices]).encode()  # the rows, not how
        return hashlib.sha256(payload).hexdigest()

    def to_dict(self) -> dict:
        return {**asdict(self), "sha256": self.sha256}


def permutation(total_rows: int, data_seed: int) -> list[int]:
    return np.random.default_rng(data_seed).permutation(total_rows).tolist()


def holdout_indices(total_rows: int, data_seed: int, holdout: int) -> list[int]:
    return permutation(total_rows, data_seed)[:holdout]


def training_order(total_rows: int, data_seed: int, seed: int, holdout: int = 0) -> list[int]:
    """Every row outside the holdout, in the order seed `seed` draws them."""
    held = set(holdout_indices(total_rows, data_seed, holdout))
    rest = [i for i in range(total_rows) if i not in held]
    order = np.random.default_rng([data_seed, seed]).permutation(len(rest))
    return [rest[j] for j in order]


def usable_rows(data: Normalized, data_seed: int, holdout: int) -> int:
    """Rows a subset can draw from: valid and not held out (the same for every seed)."""
    held = set(holdout_indices(data.total_rows, data_seed, holdout))
    return sum(1 for i in data.records if i not in held)


def take_subset(data: Normalized, n: int | None, data_seed: int, seed: int, holdout: int = 0) -> Subset:
    """The first n usable rows of seed `seed`'s order after the holdout (all of them for None)."""
    pool = [i for i in training_order(data.total_rows, data_seed, seed, holdout) if i in data.records]
    n = len(pool) if n is None else n
    if n > len(pool):
        raise DataError(f"{data.name} ({data.source}): asked for n={n} {data.form} examples but only "
                        f"{len(pool)} usable rows exist ({data.total_rows} rows, {holdout} held out, "
                        f"{data.bad_count} bad)")
    return Subset(data.name, data.form, data.source, data_seed, seed, holdout, n, pool[:n], data.dropped())


def records_of(data: Normalized, indices: list[int]) -> list[dict]:
    return [data.records[i] for i in indices if i in data.records]
