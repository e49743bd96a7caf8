"""The asset cache: its root, the `.complete.json` markers, per-asset locks and atomic staging.

An output (file or directory) is written at a `.NAME.partial-*` path beside its final path and
renamed into place; then the marker, which lists the sha256 of every output, is written. Checking
an asset re-hashes its outputs against the marker, so a missing, stale or corrupted output is
found and named.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from d2lora_dist.fileio import exclusive, sha256_file

DEFAULT_CACHE: Path = Path(os.environ.get("D2LORA_ASSETS") or "~/.cache/d2lora_dist/assets").expanduser()
MARKER = ".complete.json"
NOT_BUILT = "not built yet"  # what check_outputs says of an asset with neither outputs nor marker


def cache_root(cache_dir: Path | str | None) -> Path:
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser().absolute()


def marker_path(final: Path, is_dir: bool) -> Path:
    """A directory asset keeps its marker inside; a file asset beside it."""
    return (final if is_dir else final.parent) / MARKER


def check_outputs(final: Path, is_dir: bool, version: int) -> tuple[str | None, str]:
    """(None, summary) when the marker matches the outputs, else (what is wrong, "")."""
    marker = marker_path(final, is_dir)
    if not marker.exists():
        return (NOT_BUILT if not final.exists() else f"{marker} is missing"), ""
    try:
        record = json.loads(marker.read_text())
        files, recorded, summary = record["files"], record["recipe_version"], record["summary"]
    except (ValueError, KeyError) as e:
        return f"unreadable marker {marker} ({type(e).__name__}: {e})", ""
    if recorded != version:
        return f"conversion recipe changed (v{recorded} -> v{version})", ""
    base = marker.parent
    for rel, expected in files.items():
        path = base / rel
        if not path.is_file():
            return f"output {path} is missing", ""
        actual = sha256_file(path)
        if actual != expected:
            return f"output {path} is corrupted (sha256 {actual}, expected {expected})", ""
    return None, summary


def install(final: Path, is_dir: bool, write: Callable[[Path], str]) -> tuple[str, dict[str, str]]:
    """`write(staging)` writes the complete output at a fresh staging path beside `final` and returns
    a summary; the output is hashed and renamed into place. Returns (summary, {relative path: sha256})."""
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_partials(final)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        summary = write(staging)
        files = _hash_tree(staging) if is_dir else {final.name: sha256_file(staging)}
        _move_into_place(staging, final)
    finally:
        _remove(staging)  # only still there when writing or the move failed
    return summary, files


def write_marker(final: Path, is_dir: bool, record: dict[str, Any]) -> None:
    """Written last, once the outputs it lists are in place."""
    _write_atomic(marker_path(final, is_dir), json.dumps(record, indent=2) + "\n")


def locked(cache: Path, key: str) -> contextlib.AbstractContextManager[None]:
    """An exclusive flock per asset/archive: other processes wait, then find the work done."""
    return exclusive(cache / ".locks" / f"{key}.lock", key)


def _move_into_place(staging: Path, final: Path) -> None:
    # A directory cannot replace a non-empty one atomically: remove the old first. A crash in
    # between leaves no marker-listed outputs, so the next call rebuilds.
    if staging.is_dir() and final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def _remove_partials(final: Path) -> None:
    """Leftovers of killed runs (the caller holds the asset's lock, so no live process owns them)."""
    for stale in final.parent.glob(f".{final.name}.partial-*"):
        _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _hash_tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MARKER}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
