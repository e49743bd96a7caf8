"""The errors of the assets package."""

from __future__ import annotations

from d2lora_dist.errors import InputError


class AssetError(InputError):
    """An asset that cannot be fetched, converted or used; the message names the archive or file
    (the command line reports it in one line with exit code 2)."""


class AssetNotFetchedError(AssetError):
    """An asset that is not (validly) in the cache when a path to it is resolved. Resolving never
    downloads; the message names the command that does."""
