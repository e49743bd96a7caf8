"""Scoring: ROUGE on known strings, GSM8K (both answer filters) and ARC aggregation,
per-item scores, predictions-file validation."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from d2lora_dist.errors import InputError
from d2lora_dist.evaluate.scoring import (
    ITEM_SCORES,
    arc_predictions,
    item_scores,
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
    assert metrics == {"rouge1": 0.5, "rouge2": 0.5, "rougeL": 0.5, "bare_title": 0.5, "items": 2}


def test_score_titles_scores_the_title_after_a_preamble_not_the_preamble():
    rows = [{"completion": "Here is a concise title for the paper:\n\nLow Rank Adapters", "reference": "low rank adapters"},
            {"completion": "Low rank adapters", "reference": "low rank adapters"}]
    assert score_titles(rows) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "bare_title": 0.5, "items": 2}
    assert item_scores("titles", [{"id": i, **row, **score_row("titles", row["completion"], row["reference"])}
                                  for i, row in enumerate(rows)])["bare_title"] == {"0": 0.0, "1": 1.0}


# strict: 2 of 4 (rows 0 and 1); flexible: 3 of 4 (row 2 has no marker but ends on the answer);
# lm-eval's strict-match: 0 (no "#### "); its flexible-extract: 2 ("1,234.0" is not the string "1234")
GSM8K_ROWS = [
    {"id": "q0", "completion": "The answer is 18.", "reference": "x\n#### 18"},
    {"id": "q1", "completion": "The answer is 1,234.0", "reference": "#### 1,234"},
    {"id": "q2", "completion": "So 9 * 2 = 18", "reference": "#### 18"},
    {"id": "q3", "completion": "I give up", "reference": "#### 3"},
]


def test_score_gsm8k_reports_both_filters_and_the_flexible_headline_by_default():
    assert score_gsm8k(GSM8K_ROWS) == {"accuracy": 3 / 4, "strict_accuracy": 2 / 4, "flexible_accuracy": 3 / 4,
                                       "strict_match": 0.0, "flexible_extract": 2 / 4, "items": 4, "correct": 3}


def test_score_gsm8k_strict_filter_makes_the_strict_accuracy_the_headline():
    assert score_gsm8k(GSM8K_ROWS, "strict") == {"accuracy": 2 / 4, "strict_accuracy": 2 / 4,
                                                 "flexible_accuracy": 3 / 4, "strict_match": 0.0,
                                                 "flexible_extract": 2 / 4, "items": 4, "correct": 2}


def test_score_gsm8k_unknown_filter_is_an_error():
    with pytest.raises(ValueError, match=r"answer_filter must be one of \['flexible', 'strict'\], got 'exact'"):
        score_gsm8k(GSM8K_ROWS, "exact")  # type: ignore[arg-type]


def test_score_row_gsm8k_gives_both_filters_and_the_headline():
    both = {"extracted_strict": None, "correct_strict": False, "extracted_flexible": "17", "correct_flexible": True,
            "extracted_strict_match": "[invalid]", "correct_strict_match": False,
            "extracted_flexible_extract": "17.0", "correct_flexible_extract": False}
    assert score_row("gsm8k", "so 17.0", "#### 17") == {"extracted": "17", "correct": True, **both}
    assert score_row("gsm8k", "so 17.0", "#### 17", "strict") == {"extracted": None, "correct": False, **both}
    assert score_row("gsm8k", "nothing", "#### 17") == {
        "extracted": None, "correct": False, "extracted_strict": None, "correct_strict": False,
        "extracted_flexible": None, "correct_flexible": False, "extracted_strict_match": "[invalid]",
        "correct_strict_match": False, "extracted_flexible_extract": "[invalid]", "correct_flexible_extract": False}


def test_score_row_titles_and_unknown_kind():
    scored = score_row("titles", '"Run Models"', "running model")
    assert scored["extracted"] == "Run Models" and scored["score"]["rouge1"] == 1.0
    with pytest.raises(ValueError, match="kind"):
        score_row("arc", "a", "b")  # type: ignore[arg-type]


@pytest.mark.parametrize("answer_filter", ["strict", "flexible"])
def test_gsm8k_item_scores_average_to_the_metrics(answer_filter):
    # The report's paired intervals resample ITEM_SCORES: their means must be the metrics.
    rows = [{**row, **score_row("gsm8k", row["completion"], row["reference"], answer_filter)} for row in GSM8K_ROWS]
    per_item = item_scores("gsm8k", rows)
    metrics = score_gsm8k(GSM8K_ROWS, answer_filter)
    assert set(per_item) == set(ITEM_SCORES["gsm8k"]) == {"accuracy", "strict_accuracy", "flexible_accuracy",
                                                          "strict_match", "flexible_extract"}
    for metric, scores in per_item.items():
        assert list(scores) == ["q0", "q1", "q2", "q3"]
        assert math.isclose(sum(scores.values()) / len(scores), metrics[metric]), metric


def test_gsm8k_item_scores_read_each_metrics_own_row_field():
    row = {"id": 7, "correct": True, "correct_strict": False, "correct_flexible": True,
           "correct_strict_match": True, "correct_flexible_extract": False}
    assert item_scores("gsm8k", [row]) == {"accuracy": {"7": 1.0}, "strict_accuracy": {"7": 0.0},
                                           "flexible_accuracy": {"7": 1.0}, "strict_match": {"7": 1.0},
                                           "flexible_extract": {"7": 0.0}}
    row = {"id": 7, "correct": False, "correct_strict": False, "correct_flexible": True}
    assert item_scores("gsm8k", [row])["accuracy"] == {"7": 0.0}
    # a file written before lm-eval's filters were scored has no per-item value for them
    assert set(item_scores("gsm8k", [row])) == {"accuracy", "strict_accuracy", "flexible_accuracy"}


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
    assert score_file("gsm8k", gsm) == {"accuracy": 0.5, "strict_accuracy": 0.5, "flexible_accuracy": 0.5,
                                        "strict_match": 0.0, "flexible_extract": 0.5, "items": 2, "correct": 1}
    titles = write_jsonl(tmp_path / "titles.jsonl", [{"completion": "a b", "reference": "a b"}])
    assert score_file("titles", titles)["rougeL"] == 1.0


def test_score_file_gsm8k_rescores_completions_and_takes_the_headline_filter(tmp_path):
    # Stored extracted/correct fields are ignored: a changed extractor rescores old files.
    stale = {"extracted": "5", "correct": False, "correct_strict": False, "correct_flexible": False}
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [{**row, **stale} for row in GSM8K_ROWS])
    assert score_file("gsm8k", path) == score_gsm8k(GSM8K_ROWS)
    assert score_file("gsm8k", path, answer_filter="strict") == score_gsm8k(GSM8K_ROWS, "strict")
    assert score_file("gsm8k", path)["accuracy"] == 3 / 4
    assert score_file("gsm8k", path, answer_filter="strict")["accuracy"] == 2 / 4


def test_score_file_answer_filter_is_for_gsm8k_only(tmp_path):
    titles = write_jsonl(tmp_path / "titles.jsonl", [{"completion": "a b", "reference": "a b"}])
    with pytest.raises(ValueError, match="answer_filter applies to gsm8k only, got it for kind 'titles'"):
        score_file("titles", titles, answer_filter="strict")


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


def test_item_scores_leave_out_a_metric_whose_field_older_predictions_lack() -> None:
    from d2lora_dist.evaluate.scoring import item_scores

    old_rows = [{"id": "a", "correct": True}, {"id": "b", "correct": False}]  # before strict/flexible
    assert item_scores("gsm8k", old_rows) == {"accuracy": {"a": 1.0, "b": 0.0}}
    with pytest.raises(ValueError, match="row 1 has no 'id'"):
        item_scores("gsm8k", [{"id": "a", "correct": True}, {"correct": True}])


@pytest.mark.parametrize("row, problem", [
    ({"choices": ["a", "b", "c"], "logliks": [-1.0, -2.0], "gold": 0}, "2 'logliks' for 3 'choices'"),
    ({"choices": ["a", "b"], "logliks": [-1.0, "x"], "gold": 0}, "'logliks' must hold numbers only"),
    ({"choices": ["a", "b"], "logliks": [-1.0, -2.0], "gold": 2}, "'gold' 2 is not the index of one of its 2 choices"),
    ({"choices": ["a", "b"], "logliks": [-1.0, -2.0], "gold": -1}, "'gold' -1 is not the index"),
    ({"choices": [], "logliks": [], "gold": 0}, "'choices' must be a non-empty list of strings"),
    ({"choices": ["a", 3], "logliks": [-1.0, -2.0], "gold": 0}, "'choices' must be a non-empty list of strings"),
])
def test_score_file_arc_names_the_line_of_an_unscorable_row(tmp_path, row, problem):
    good = {"choices": ["a", "b"], "logliks": [-1.0, -2.0], "gold": 0}
    path = write_jsonl(tmp_path / "arc.jsonl", [good, row])
    with pytest.raises(InputError, match=f"{path}:2: {re.escape(problem)}"):
        score_file("arc", path)
