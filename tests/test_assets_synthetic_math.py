"""Synthetic math in the Math-Step-DPO-10K schema (`d2lora_dist.assets.synthetic_math`): the row
builder on a golden example, and the 1500 rows generated from reasoning-gym's pinned wheel."""

from __future__ import annotations

import random
from decimal import Decimal
from pathlib import Path

from d2lora_dist.assets import MATH_ROWS, ensure_asset, math_step_row, synthetic_math
from tests.assets_fixtures import private_copy, rows


def _final_answer(text: str) -> Decimal:
    return Decimal(text.rsplit("The answer is: ", 1)[1].replace(",", ""))


def test_math_synthetic_rows_follow_step_dpo(data: dict[str, Path]) -> None:
    table = rows(data["math_synthetic"])
    assert len(table) == MATH_ROWS
    for r in table:
        assert set(r) == {"dataset", "prompt", "initial_reason_steps", "chosen", "rejected",
                          "full_chosen", "full_rejected", "answer"}
        assert r["dataset"] == "gsm_symbolic"
        assert not r["prompt"].endswith("Do not include units.")
        k = r["initial_reason_steps"].count("Step ")
        assert r["initial_reason_steps"].startswith("Let's think step by step.\nStep 1:")
        assert r["initial_reason_steps"].endswith(f"\nStep {k}:")
        assert r["chosen"] != r["rejected"]
        assert r["full_chosen"].startswith(r["chosen"]) and r["full_rejected"].startswith(r["rejected"])
        assert _final_answer(r["full_chosen"]) == Decimal(r["answer"])
        assert _final_answer(r["full_rejected"]) != Decimal(r["answer"])
    assert len({r["initial_reason_steps"].count("Step ") for r in table}) > 3  # k varies, 0 included


def test_math_step_row_corrupts_one_result_and_the_final_answer() -> None:
    cot = "She buys 3 * 4 = 12 apples.\nShe eats 2, leaving 12 - 2 = 10 apples.\n#### 10"
    question = "How many apples are left?" + synthetic_math._GSM_SUFFIX
    seen_k = set()
    for seed in range(20):
        r = math_step_row(question, cot, "10", random.Random(seed))
        seen_k.add(r["initial_reason_steps"].count("Step "))
        assert r["prompt"] == "How many apples are left?"
        whole = r["initial_reason_steps"] + r["full_chosen"]
        assert whole == ("Let's think step by step.\nStep 1: She buys 3 * 4 = 12 apples.\n"
                         "Step 2: She eats 2, leaving 12 - 2 = 10 apples.\nThe answer is: 10")
        assert r["rejected"] != r["chosen"] and _final_answer(r["full_rejected"]) != 10
    assert seen_k == {1, 2}


def test_math_synthetic_is_reproducible(tmp_path: Path, cache: Path, data: dict[str, Path]) -> None:
    rebuilt = ensure_asset("math_synthetic", private_copy(tmp_path, cache), progress=False)
    assert rebuilt.read_bytes() == data["math_synthetic"].read_bytes()
