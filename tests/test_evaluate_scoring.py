"""Scoring: ROUGE on known strings, GSM8K/ARC aggregation, predictions-file validation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from d2lora_dist.evaluate.scoring import (
    arc_predictions,
    rouge_f1,
    score_arc,
    score_file,
    score_gsm8k,
    score_row,
    score_titles,
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_rouge_identical_is_one_and_disjoint_is_zero():
    assert rouge_f1("low rank adapters for language models", "low rank adapters for language models") == {
        "rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge_f1("graph neural networks", "economic growth in europe") == {
        "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_uses_stemming():
    assert rouge_f1("running models", "run model")["rouge1"] == 1.0


def test_rouge_partial_overlap():
    scores = rouge_f1("fast low rank adapters", "low rank adapters")  # P = 3/4, R = 1
    assert math.isclose(scores["rouge1"], 2 * 0.75 / 1.75)
    assert 0.0 < scores["rouge2"] < 1.0


def test_score_titles_means_and_extracts_the_title():
    rows = [{"completion": "Title: Low Rank Adapters\nI chose this because...", "reference": "low rank adapters"},
            {"completion": "graph neural networks", "reference": "economic growth"}]
    metrics = score_titles(rows)
    assert metrics == {"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5, "items": 2}


def test_score_gsm8k():
    rows = [{"completion": "The answer is 18.", "reference": "x\n#### 18"},
            {"completion": "The answer is 1,234.0", "reference": "#### 1,234"},
            {"completion": "I give up", "reference": "#### 3"}]
    assert score_gsm8k(rows) == {"accuracy": 2 / 3, "items": 3, "correct": 2}


def test_score_row():
    assert score_row("gsm8k", "so 17.0", "#### 17") == ("17", True)
    assert score_row("gsm8k", "nothing", "#### 17") == (None, False)
    title, scores = score_row("titles", '"Run Models"', "running model")
    assert title == "Run Models" and scores["rouge1"] == 1.0
    with pytest.raises(ValueError, match="kind"):
        score_row("arc", "a", "b")  # type: ignore[arg-type]


def test_arc_normalised_prediction_divides_by_choice_characters():
    # raw: choice 0 wins; per character (no leading space): -6/12 = -0.5 beats -3/2 = -1.5
    assert arc_predictions([-3.0, -6.0], ["ab", "abcdefghijkl"]) == (0, 1)
    rows = [{"choices": ["ab", "abcdefghijkl"], "logliks": [-3.0, -6.0], "gold": 1}]
    assert score_arc(rows) == {"accuracy": 0.0, "accuracy_norm": 1.0, "items": 1}


@pytest.mark.parametrize("scorer", [score_gsm8k, score_titles, score_arc])
def test_scoring_no_rows_is_an_error(scorer):
    with pytest.raises(ValueError, match="no rows"):
        scorer([])


def test_score_file_gsm8k_and_titles(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"id": "a", "completion": "The answer is 5", "reference": "#### 5", "extra": 1},
        "",  # blank lines are tolerated
        {"id": "b", "completion": "The answer is 4", "reference": "#### 5"},
    ])
    assert score_file("gsm8k", gsm) == {"accuracy": 0.5, "items": 2, "correct": 1}
    titles = write_jsonl(tmp_path / "titles.jsonl", [{"completion": "a b", "reference": "a b"}])
    assert score_file("titles", titles)["rougeL"] == 1.0


@pytest.mark.parametrize("lines, message", [
    ([{"completion": "x", "reference": "#### 1"}, {"completion": "x"}],
     r":2: missing key 'reference'"),
    ([{"reference": "#### 1"}], r":1: missing key 'completion'"),
    ([{"completion": "x", "reference": "#### 1"}, "{not json"], r":2: not valid JSON"),
    (["[1, 2]"], r":1: expected a JSON object"),
    ([{"completion": None, "reference": "#### 1"}], r":1: key 'completion' is a NoneType, expected str"),
])
def test_score_file_bad_rows_name_file_line_and_key(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "preds.jsonl", lines)
    with pytest.raises(ValueError, match=message) as info:
        score_file("gsm8k", path)
    assert str(path) in str(info.value)


def test_score_file_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty predictions file") as info:
        score_file("titles", path)
    assert str(path) in str(info.value)


def test_score_file_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        score_file("mmlu", tmp_path / "x.jsonl")  # type: ignore[arg-type]
