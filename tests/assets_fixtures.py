"""Helpers shared by the test_assets*.py modules: one asset cache per session, fetched once.

The archives (~190 MB) are downloaded once per session into a temp cache, or reused from the cache
that D2LORA_ASSETS names. Tests that damage outputs work on a private cache whose archives/ links
to the session's, so they never touch a shared cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from d2lora_dist.assets import ASSET_NAMES, fetch_all

DATA_ASSETS = [n for n in ASSET_NAMES if n != "smollm2"]


def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$D2LORA_ASSETS, else one temp cache for the whole session (every module finds the same one)."""
    shared = os.environ.get("D2LORA_ASSETS")
    return Path(shared) if shared else tmp_path_factory.getbasetemp() / "assets"


def fetch_data(cache: Path) -> dict[str, Path]:
    """Every data asset, fetched (once) and verified."""
    return fetch_all(cache, only=DATA_ASSETS, progress=False)


def private_copy(tmp_path: Path, cache: Path) -> Path:
    """A fresh cache that shares `cache`'s (already verified) archives."""
    root = tmp_path / "cache"
    root.mkdir()
    (root / "archives").symlink_to(cache / "archives")
    return root


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
