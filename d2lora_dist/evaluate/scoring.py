"""Metrics from predictions: per row, per list of rows, and per predictions file.

A predictions JSONL is the source of truth for a suite's numbers: `score_file` recomputes
them from `completion` and `reference` alone, so a fixed extractor can rescore old runs.
The suites compute their returned metrics with these same functions.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from d2lora_dist.evaluate.answers import extract_answer, extract_title, reference_answer

ScoreKind = Literal["gsm8k", "titles", "arc"]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# Keys (and their JSON types) each row of a predictions file needs, per kind; arc rows
# are rescored from their stored log-likelihoods.
REQUIRED_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "gsm8k": {"completion": str, "reference": (str, int, float)},
    "titles": {"completion": str, "reference": str},
    "arc": {"choices": list, "logliks": list, "gold": int},
}


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    # Built once: constructing the stemmer per row dominates the cost otherwise.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_f1(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one prediction against one reference (each in [0, 1])."""
    scores = _rouge_scorer().score(reference, prediction)  # argument order: target, prediction
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def score_row(kind: ScoreKind, completion: str, reference: str) -> tuple[str | None, bool | dict[str, float]]:
    """(extracted answer, correctness) for gsm8k; (extracted title, ROUGE F1s) for titles."""
    if kind == "gsm8k":
        extracted = extract_answer(completion)
        return extracted, extracted is not None and extracted == reference_answer(reference)
    if kind == "titles":
        title = extract_title(completion)
        return title, rouge_f1(title, reference)
    raise ValueError(f"score_row: kind must be 'gsm8k' or 'titles', got {kind!r}")


def _require_rows(rows: Sequence[Any], what: str) -> None:
    if not rows:
        raise ValueError(f"{what}: no rows to score")


def score_gsm8k(rows: Iterable[dict[str, Any]]) -> dict[str, float | int]:
    """Exact-match accuracy of extracted vs reference numbers."""
    rows = list(rows)
    _require_rows(rows, "score_gsm8k")
    correct = sum(bool(score_row("gsm8k", r["completion"], r["reference"])[1]) for r in rows)
    return {"accuracy": correct / len(rows), "items": len(rows), "correct": correct}


def score_titles(rows: Iterable[dict[str, Any]]) -> dict[str, float | int]:
    """Mean ROUGE-1/2/L F1 of extracted titles vs reference titles."""
    rows = list(rows)
    _require_rows(rows, "score_titles")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for row in rows:
        scores = rouge_f1(extract_title(row["completion"]), row["reference"])
        for name in ROUGE_TYPES:
            totals[name] += scores[name]
    return {**{name: total / len(rows) for name, total in totals.items()}, "items": len(rows)}


def arc_predictions(logliks: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax log-likelihood, argmax log-likelihood per character) over the choices.

    The per-character normalisation divides by the length of the choice text without
    the leading space delimiter: the lm-eval-harness `acc_norm` definition, so numbers
    are comparable with published ARC-Easy results.
    """
    if len(logliks) != len(choices) or not choices:
        raise ValueError(f"{len(logliks)} log-likelihoods for {len(choices)} choices")
    pred = max(range(len(choices)), key=lambda i: logliks[i])
    pred_norm = max(range(len(choices)), key=lambda i: logliks[i] / max(len(choices[i]), 1))
    return pred, pred_norm


def score_arc(rows: Iterable[dict[str, Any]]) -> dict[str, float | int]:
    """Accuracy and length-normalised accuracy of multiple-choice log-likelihood rows."""
    rows = list(rows)
    _require_rows(rows, "score_arc")
    hits = hits_norm = 0
    for row in rows:
        pred, pred_norm = arc_predictions(row["logliks"], row["choices"])
        hits += pred == row["gold"]
        hits_norm += pred_norm == row["gold"]
    return {"accuracy": hits / len(rows), "accuracy_norm": hits_norm / len(rows), "items": len(rows)}


SCORERS = {"gsm8k": score_gsm8k, "titles": score_titles, "arc": score_arc}


def read_predictions(path: str | Path, required: dict[str, type | tuple[type, ...]]) -> list[dict[str, Any]]:
    """Rows of a predictions JSONL; blank lines are skipped, anything else bad raises
    ValueError naming the file, the line number and the problem."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing key {missing[0]!r} "
                                 f"(each row needs {list(required)}; this row has {sorted(row)})")
            for key, types in required.items():
                if not isinstance(row[key], types):
                    names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
                    raise ValueError(f"{path}:{lineno}: key {key!r} is a {type(row[key]).__name__}, "
                                     f"expected {names}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty predictions file (no rows to score)")
    return rows


def score_file(kind: ScoreKind, path: str | Path) -> dict[str, float | int]:
    """Recompute a suite's metrics from its predictions JSONL."""
    if kind not in SCORERS:
        raise ValueError(f"score_file: kind must be one of {sorted(SCORERS)}, got {kind!r}")
    return SCORERS[kind](read_predictions(path, REQUIRED_KEYS[kind]))
