"""Nested, seeded subsets: one fixed permutation of the raw rows per dataset and data seed.

The first `holdout` positions are reserved for evaluation; an n-subset is the first n
usable rows after them, so 1k is a prefix of 2k is a prefix of 5k, the same rows serve
every method and seed, and the indices are saved with the cell.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import numpy as np

from d2lora_dist.data.loading import DataError, Normalized


@dataclass(frozen=True)
class Subset:
    dataset: str
    form: str
    source: str
    data_seed: int
    holdout: int
    n: int
    indices: list[int]

    @property
    def sha256(self) -> str:
        payload = json.dumps([self.dataset, self.source, self.form, self.indices]).encode()
        return hashlib.sha256(payload).hexdigest()

    def to_dict(self) -> dict:
        return {**asdict(self), "sha256": self.sha256}


def permutation(total_rows: int, data_seed: int) -> list[int]:
    return np.random.default_rng(data_seed).permutation(total_rows).tolist()


def holdout_indices(total_rows: int, data_seed: int, holdout: int) -> list[int]:
    return permutation(total_rows, data_seed)[:holdout]


def take_subset(data: Normalized, n: int | None, data_seed: int, holdout: int = 0) -> Subset:
    """The first n usable rows after the holdout, in permutation order (all of them for None)."""
    pool = [i for i in permutation(data.total_rows, data_seed)[holdout:] if i in data.records]
    n = len(pool) if n is None else n
    if n > len(pool):
        raise DataError(f"{data.name} ({data.source}): asked for n={n} {data.form} examples but only "
                        f"{len(pool)} usable rows exist ({data.total_rows} rows, {holdout} held out, "
                        f"{data.bad_count} bad)")
    return Subset(data.name, data.form, data.source, data_seed, holdout, n, pool[:n])


def records_of(data: Normalized, indices: list[int]) -> list[dict]:
    return [data.records[i] for i in indices if i in data.records]
