"""lm-eval's own GSM8K filters (`evaluate.lm_eval_gsm8k`) beside the project's, on completions where the two
conventions disagree. Expected values follow lm-eval 0.4's gsm8k.yaml, RegexFilter and exact_match by hand."""

from __future__ import annotations

import pytest

from d2lora_dist.evaluate.lm_eval_gsm8k import exact_match, flexible_extract, strict_match
from d2lora_dist.evaluate.scoring import score_gsm8k, score_row

GOLD = "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"

# completion, reference, (project strict, project flexible), (lm-eval strict-match, flexible-extract) correct
DISAGREEMENTS = [
    # both conventions read the gold format; lm-eval removes the thousands comma from both sides
    ("So the total is 1000.\n#### 1,000", "1000", (True, True), (True, True)),
    # no "####": lm-eval's strict-match is invalid; flexible-extract drops "$" and the final "."
    ("The answer is $5.", "#### 5", (True, True), (False, True)),
    # lm-eval compares strings: 18.0 is not 18
    ("The answer is 18.0", GOLD, (True, True), (False, False)),
    # a hallucinated next question: lm-eval's last number is the stray 4, ours is the marked 18
    ("The answer is 18.\nQuestion: A farmer has 4 cows.", GOLD, (True, True), (False, False)),
    # two "####": lm-eval's strict-match takes the first, our strict the last
    ("#### 18\nNext question ... #### 20", GOLD, (False, False), (True, False)),
    # "####" without its space: not lm-eval's gold format; ours reads it
    ("####18", GOLD, (True, True), (False, True)),
    # several numbers after the marker: lm-eval's first group vs our last number of the sentence
    ("#### 18 eggs, 3 left over", GOLD, (False, False), (True, False)),
    # a trailing ellipsis is lm-eval's flexible answer ("18.." after one "." is removed)
    ("The answer is 18...", GOLD, (True, True), (False, False)),
    # unicode minus: ours reads -7; lm-eval's flexible-extract reads "7."
    ("The answer is −7.", "#### -7", (True, True), (False, False)),
    # a chain of thought without any marker: both flexible filters read the last number
    ("9 * 2 = 18", GOLD, (False, True), (False, True)),
    # no number at all: "[invalid]" for lm-eval, nothing for ours
    ("I do not know.", GOLD, (False, False), (False, False)),
    # a bare numeric reference (a JSON number in a predictions file) is compared as its string
    ("She earns $1,250.", 1250, (False, True), (False, True)),
]


@pytest.mark.parametrize(("completion", "reference", "ours", "lm_eval"), DISAGREEMENTS)
def test_lm_eval_filters_beside_the_projects_on_one_row(completion, reference, ours, lm_eval) -> None:
    row = score_row("gsm8k", completion, reference)
    assert (row["correct_strict"], row["correct_flexible"]) == ours
    assert (row["correct_strict_match"], row["correct_flexible_extract"]) == lm_eval


def test_extracted_strings_are_lm_evals_own() -> None:
    assert strict_match("#### 1,000.\nthen #### 7") == "1,000."  # first match, its group, commas and dot kept
    assert strict_match("The answer is 18") == "[invalid]"
    assert flexible_extract("It costs $5. Then 3 more...") == "..."  # last match, any run of [$0-9.,] of 2+
    assert flexible_extract("The answer is -$4,5") == "-$4,5"
    assert flexible_extract("x 7 y") == "7"  # the single-digit group
    assert flexible_extract("no digits") == "[invalid]"
    row = score_row("gsm8k", "The answer is $5.", "#### 5")
    assert (row["extracted_strict_match"], row["extracted_flexible_extract"]) == ("[invalid]", "$5.")
    assert (row["extracted_strict"], row["extracted_flexible"]) == ("5", "5")  # the project's are canonical


def test_exact_match_strips_both_sides_in_lm_evals_order() -> None:
    assert exact_match("1,000.", "She paid $1,000.\n#### 1,000")  # ",", "$", up to the last "#### ", final "."
    assert exact_match("$18", "#### 18") and not exact_match("18..", "#### 18")  # one final "." only
    assert not exact_match("18.00", "#### 18") and not exact_match("[invalid]", "#### 18")
    assert exact_match("ABC", "#### abc")  # ignore_case
    assert not exact_match("-5", "#### 5")


def test_score_gsm8k_reports_lm_evals_accuracies_beside_ours() -> None:
    rows = [{"completion": c, "reference": r} for c, r, _, _ in DISAGREEMENTS]
    metrics = score_gsm8k(rows)
    n = len(rows)
    assert metrics["strict_accuracy"] == sum(o[0] for _, _, o, _ in DISAGREEMENTS) / n
    assert metrics["flexible_accuracy"] == sum(o[1] for _, _, o, _ in DISAGREEMENTS) / n
    assert metrics["strict_match"] == 3 / n and metrics["flexible_extract"] == 5 / n
