"""Data-parallel evaluation: each rank scores a slice of the items, rank 0 reassembles.

Evaluation runs without ZeRO: every rank holds the whole (adapted) model and only the
items are split, so no collective runs inside a forward pass and ranks may generate
different numbers of tokens. The only collective is the final gather of result rows.

Sharding is STRIDED (rank r takes items r, r+W, r+2W, ...): suites are often ordered
by length or difficulty, and striding gives every rank a similar mix, so ranks finish
at about the same time. Reassembly interleaves the shards back into input order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from d2lora_dist import distributed

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world: int) -> list[T]:
    """Items rank `rank` of `world` evaluates: every world-th item starting at rank."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard: need 0 <= rank < world, got rank={rank}, world={world}")
    return list(items[rank::world])


def _interleave(shards: Sequence[Sequence[Any]], world: int) -> list[Any]:
    """Inverse of `shard`: shard r holds original positions r, r+W, ..."""
    total = sum(len(s) for s in shards)
    rows: list[Any] = [None] * total
    for rank, part in enumerate(shards):
        expected = len(range(rank, total, world))
        if len(part) != expected:
            raise RuntimeError(f"gather_in_order: rank {rank} returned {len(part)} rows, expected "
                               f"{expected} for {total} items over {world} ranks (was it sharded "
                               f"with shard()?)")
        rows[rank::world] = part
    return rows


def gather_in_order(local_rows: Sequence[Any], rank: int, world: int,
                    all_ranks: bool = False) -> list[Any] | None:
    """All ranks' rows in the original item order: on rank 0 (None on the others), or on
    every rank with `all_ranks` (so each rank can compute the same metrics).

    Collective: every rank of the group must call it. Rows are pickled objects, so they
    travel over the process group's backend (distributed owns the collectives).
    """
    if world == 1:
        return list(local_rows)
    if world != distributed.world_size():
        raise RuntimeError(f"gather_in_order: world={world} but the process group has {distributed.world_size()} "
                           "rank(s): torch.distributed is not initialised for this launch")
    if all_ranks:
        return _interleave(distributed.all_gather_objects(list(local_rows)), world)
    shards = distributed.gather_objects_to_main(list(local_rows))
    return _interleave(shards, world) if shards is not None else None
