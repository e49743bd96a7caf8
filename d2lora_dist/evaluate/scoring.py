"""Metrics from predictions: per row, per list of rows, and per predictions file.

A predictions JSONL is the source of truth for a suite's numbers: `score_file` recomputes
them from `completion` and `reference` alone, so a fixed extractor can rescore old runs.
The suites compute their returned metrics with these same functions.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from d2lora_dist.errors import InputError, MissingInput
from d2lora_dist.evaluate.answers import (
    ANSWER_FILTERS,
    AnswerFilter,
    answer_extractor,
    extract_title,
    is_bare_title,
    reference_answer,
)
from d2lora_dist.evaluate.lm_eval_gsm8k import LM_EVAL_FILTERS, lm_eval_row_scores

ScoreKind = Literal["gsm8k", "titles", "arc"]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
# Keys (and their JSON types) each row of a predictions file needs, per kind; arc rows
# are rescored from their stored log-likelihoods.
REQUIRED_KEYS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "gsm8k": {"completion": str, "reference": (str, int, float)},
    "titles": {"completion": str, "reference": str},
    "arc": {"choices": list, "logliks": list, "gold": int},
}


def _arc_row_problem(row: dict[str, Any]) -> str | None:
    """What makes a multiple-choice row unscorable (None when it is scorable)."""
    choices, logliks, gold = row["choices"], row["logliks"], row["gold"]
    if not choices or not all(isinstance(c, str) for c in choices):
        return "'choices' must be a non-empty list of strings"
    if len(logliks) != len(choices):
        return f"{len(logliks)} 'logliks' for {len(choices)} 'choices'"
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in logliks):
        return "'logliks' must hold numbers only"
    if isinstance(gold, bool) or not 0 <= gold < len(choices):
        return f"'gold' {gold!r} is not the index of one of its {len(choices)} choices"
    return None


# A check per kind beyond the keys' types: the problem of a row, None when the row can be scored.
ROW_CHECKS: dict[str, Callable[[dict[str, Any]], str | None]] = {"arc": _arc_row_problem}


@functools.lru_cache(maxsize=1)
def _rouge_scorer() -> Any:
    # Built once: constructing the stemmer per row dominates the cost otherwise.
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def rouge_f1(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F1 of one prediction against one reference (each in [0, 1])."""
    scores = _rouge_scorer().score(reference, prediction)  # argument order: target, prediction
    return {name: float(scores[name].fmeasure) for name in ROUGE_TYPES}


def gsm8k_row_scores(completion: str, reference: str, answer_filter: AnswerFilter = "flexible") -> dict[str, Any]:
    """The scored fields of one GSM8K prediction row: `extracted_<filter>` and
    `correct_<filter>` for every filter (the project's strict and flexible, and lm-eval's
    strict_match and flexible_extract), plus `extracted`/`correct` of the headline filter."""
    answer_extractor(answer_filter)  # a bad name is a ValueError that lists the valid ones
    gold = reference_answer(reference)
    fields: dict[str, Any] = {}
    for name, extract in ANSWER_FILTERS.items():
        extracted = extract(completion)
        fields[f"extracted_{name}"] = extracted
        fields[f"correct_{name}"] = extracted is not None and extracted == gold
    return {"extracted": fields[f"extracted_{answer_filter}"], "correct": fields[f"correct_{answer_filter}"],
            **fields, **lm_eval_row_scores(completion, reference)}


def score_row(kind: ScoreKind, completion: str, reference: str,
              answer_filter: AnswerFilter = "flexible") -> dict[str, Any]:
    """The scored fields of one prediction row: gsm8k_row_scores for gsm8k (answer_filter
    picks the headline); {"extracted": title, "score": ROUGE F1s, "bare_title": whether the completion
    is the title alone} for titles."""
    if kind == "gsm8k":
        return gsm8k_row_scores(completion, reference, answer_filter)
    if kind == "titles":
        title = extract_title(completion)
        return {"extracted": title, "score": rouge_f1(title, reference), "bare_title": is_bare_title(completion)}
    raise ValueError(f"score_row: kind must be 'gsm8k' or 'titles', got {kind!r}")


def _require_rows(rows: Sequence[Any], what: str) -> None:
    if not rows:
        raise ValueError(f"{what}: no rows to score")


def score_gsm8k(rows: Iterable[dict[str, Any]], answer_filter: AnswerFilter = "flexible") -> dict[str, float | int]:
    """Exact-match accuracy of extracted vs reference numbers under both answer filters,
    recomputed from `completion` and `reference`; `accuracy` and `correct` (a count) are
    the `answer_filter` one's. `strict_match` and `flexible_extract` are lm-eval's own
    (`lm_eval_gsm8k`), for comparison with published lm-eval figures."""
    answer_extractor(answer_filter)  # a bad name fails here, not after scoring every row
    rows = list(rows)
    _require_rows(rows, "score_gsm8k")
    correct = dict.fromkeys([*ANSWER_FILTERS, *LM_EVAL_FILTERS], 0)
    for row in rows:
        fields = gsm8k_row_scores(row["completion"], row["reference"], answer_filter)
        for name in correct:
            correct[name] += fields[f"correct_{name}"]
    n = len(rows)
    return {"accuracy": correct[answer_filter] / n, "strict_accuracy": correct["strict"] / n,
            "flexible_accuracy": correct["flexible"] / n,
            **{name: correct[name] / n for name in LM_EVAL_FILTERS}, "items": n, "correct": correct[answer_filter]}


def score_titles(rows: Iterable[dict[str, Any]]) -> dict[str, float | int]:
    """Mean ROUGE-1/2/L F1 of extracted titles vs reference titles, and `bare_title`: the share
    of completions that are the title alone (what the prompt asks for; docs/evaluation.md)."""
    rows = list(rows)
    _require_rows(rows, "score_titles")
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    bare = 0
    for row in rows:
        scores = rouge_f1(extract_title(row["completion"]), row["reference"])
        for name in ROUGE_TYPES:
            totals[name] += scores[name]
        bare += is_bare_title(row["completion"])
    return {**{name: total / len(rows) for name, total in totals.items()}, "bare_title": bare / len(rows),
            "items": len(rows)}


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

# Per-item value of each metric a suite reports, read from a predictions row: the metric is
# the mean of these over the rows, and the report's paired intervals resample them.
ITEM_SCORES: dict[str, dict[str, Any]] = {
    "gsm8k": {"accuracy": lambda row: float(row["correct"]),
              "strict_accuracy": lambda row: float(row["correct_strict"]),
              "flexible_accuracy": lambda row: float(row["correct_flexible"]),
              **{name: (lambda row, name=name: float(row[f"correct_{name}"])) for name in LM_EVAL_FILTERS}},
    "titles": {**{name: (lambda row, name=name: float(row["score"][name])) for name in ROUGE_TYPES},
               "bare_title": lambda row: float(row["bare_title"])},
    "arc": {"accuracy": lambda row: float(row["correct"]), "accuracy_norm": lambda row: float(row["correct_norm"])},
}


def item_scores(kind: ScoreKind, rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """metric -> {item id -> score} for every metric of the suite kind (ids pair the arms).

    A metric whose row field a file lacks (predictions written before that metric existed) is
    left out, so the report falls back to seed level for it alone and says so."""
    if kind not in ITEM_SCORES:
        raise ValueError(f"item_scores: kind must be one of {sorted(ITEM_SCORES)}, got {kind!r}")
    rows = list(rows)
    for i, row in enumerate(rows):
        if "id" not in row:
            raise ValueError(f"item_scores: {kind} row {i} has no 'id' (needed to pair items across cells)")
    out: dict[str, dict[str, float]] = {}
    for metric, value in ITEM_SCORES[kind].items():
        try:
            out[metric] = {str(row["id"]): value(row) for row in rows}
        except KeyError:
            continue
    return out


def read_predictions(path: str | Path, required: dict[str, type | tuple[type, ...]],
                     check: Callable[[dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """Rows of a predictions JSONL; blank lines are skipped, anything else bad (a row `check`
    finds a problem in, too) raises InputError naming the file, the line number and the problem."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: no such predictions file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [key for key in required if key not in row]
            if missing:
                raise InputError(f"{path}:{lineno}: missing key {missing[0]!r} "
                                 f"(each row needs {list(required)}; this row has {sorted(row)})")
            for key, types in required.items():
                if not isinstance(row[key], types):
                    names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
                    raise InputError(f"{path}:{lineno}: key {key!r} is a {type(row[key]).__name__}, "
                                     f"expected {names}")
            problem = check(row) if check else None
            if problem:
                raise InputError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    if not rows:
        raise InputError(f"{path}: empty predictions file (no rows to score)")
    return rows


def score_file(kind: ScoreKind, path: str | Path, answer_filter: AnswerFilter | None = None) -> dict[str, float | int]:
    """Recompute a suite's metrics from its predictions JSONL.

    answer_filter (gsm8k only) picks the headline `accuracy`; None = flexible. Both
    filters' accuracies are returned either way.
    """
    if kind not in SCORERS:
        raise ValueError(f"score_file: kind must be one of {sorted(SCORERS)}, got {kind!r}")
    if answer_filter is not None and kind != "gsm8k":
        raise InputError(f"score_file: answer_filter applies to gsm8k only, got it for kind {kind!r}")
    rows = read_predictions(path, REQUIRED_KEYS[kind], ROW_CHECKS.get(kind))
    if kind == "gsm8k":
        return score_gsm8k(rows, answer_filter or "flexible")
    return SCORERS[kind](rows)
