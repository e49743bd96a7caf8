"""Budgets in the open: a cell's result.json carries the optimizer steps, summed learning rate and tokens
that ran (its warm-up's beside them); the report marks a Δ whose arms' budgets differ by more than
`report.budget_ratio`, and not one under it; a bad ratio is named by its key."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoTokenizer, TrainerCallback

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.data.lengths import record_lengths
from d2lora_dist.data.selection import task_records
from d2lora_dist.layout import RunLayout
from d2lora_dist.report import report, report_from_items
from d2lora_dist.report.budgets import MARK
from d2lora_dist.schedule import plan_schedule
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep.cell import run_cell
from d2lora_dist.sweep.grid import Cell
from d2lora_dist.warmup import run_warmup
from tests.test_report import table, write_run


class RecordRates(TrainerCallback):
    """The rate each optimizer step ran at, read from the optimizer itself (the test's own account)."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.rates.append(optimizer.param_groups[0]["lr"])


def ran(recorded: RecordRates, tokens: int) -> dict:
    return {"steps": len(recorded.rates), "lr_sum": pytest.approx(sum(recorded.rates), rel=1e-12), "tokens": tokens}


def test_a_cells_budget_is_what_its_trainer_ran_plus_its_warmups(tiny_experiment: dict) -> None:
    # Schedules whose rate changes every step, and a max_length at which the trainer drops some of the
    # 8 rows: the steps that run are fewer than the configured n gives.
    tiny_experiment["warmup"]["train"] |= {"lr_scheduler": "cosine", "warmup_ratio": 0.5}
    tiny_experiment["tasks"]["math"]["suites"] = ["gsm8k"]  # evaluation is not under test here
    tiny_experiment["suites"]["gsm8k"] |= {"limit": 2, "max_new_tokens": 2}
    exp = experiment_from_dict(tiny_experiment)
    tokenizer = AutoTokenizer.from_pretrained(exp.model.name_or_path)
    records, _ = task_records(exp, "math", "sft", 8, 0)
    prompts = sorted(record_lengths(r, tokenizer)[0] for r in records)
    tiny_experiment["methods"]["sft"] |= {"max_length": prompts[len(prompts) // 2], "warmup_ratio": 0.3}
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    planned = plan_schedule(exp.methods["sft"], 8, 1).optimizer_steps

    warm_rates, cell_rates = RecordRates(), RecordRates()
    warm = run_warmup(exp, layout, callbacks=[warm_rates])
    result = run_cell(exp, layout, Cell("math", "sft", "d2lora", 8, 0), callbacks=[cell_rates])

    assert len(set(warm_rates.rates)) > 2 and len(cell_rates.rates) < planned  # the test tells them apart
    assert warm["budget"] == ran(warm_rates, warm["train"]["tokens_seen"])
    budget = result["budget"]
    assert budget["phase"] == ran(cell_rates, result["train"]["tokens_seen"])
    assert budget["warmup"] == warm["budget"]
    assert budget["total"] == {"steps": len(warm_rates.rates) + len(cell_rates.rates),
                               "lr_sum": pytest.approx(sum(warm_rates.rates) + sum(cell_rates.rates), rel=1e-12),
                               "tokens": warm["train"]["tokens_seen"] + result["train"]["tokens_seen"]}

    # Evaluated again after its training finished in an earlier run: the same budget, from its adapter's manifest.
    cell = Cell("math", "sft", "d2lora", 8, 0)
    layout.cell_result(cell.id).unlink()
    again = run_cell(exp, layout, cell, callbacks=[cell_rates])
    assert again["train"] is None and again["budget"] == budget
    # A cell that trains nothing has no phase budget; a vanilla one no warm-up's.
    base = run_cell(exp, layout, Cell("math", "none", "lora", 0, 0))["budget"]
    assert base == {"phase": {"steps": 0, "lr_sum": 0.0, "tokens": 0}, "warmup": None, "total": base["phase"]}


def budget(steps: int, lr_sum: float, warmup: tuple[int, float] | None = None) -> dict:
    phase = {"steps": steps, "lr_sum": lr_sum, "tokens": 100 * steps}
    w = None if warmup is None else {"steps": warmup[0], "lr_sum": warmup[1], "tokens": 100 * warmup[0]}
    return {"phase": phase, "warmup": w}


def with_budgets(layout, budgets: dict[str, dict]) -> None:
    for cell_id, b in budgets.items():
        path = layout.cell_result(cell_id)
        path.write_text(json.dumps(json.loads(path.read_text()) | {"budget": b}))


BUDGETS = {  # the report fixture's math SFT cells; the warm-up: 8 steps, Σ rate 0.008
    "math-sft-lora-n100-s0": budget(10, 0.010), "math-sft-lora-n100-s1": budget(10, 0.010),
    "math-sft-d2lora-n100-s0": budget(10, 0.010, (8, 0.008)), "math-sft-d2lora-n100-s1": budget(10, 0.010, (8, 0.008)),
    "math-sft-lora-n1000-s0": budget(100, 0.1), "math-sft-lora-n1000-s1": budget(100, 0.1),
    "math-sft-d2lora-n1000-s0": budget(100, 0.1, (8, 0.008)),
}


def test_the_report_marks_a_delta_whose_budgets_differ_over_the_ratio_and_not_under(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("d2lora_dist.report.write_plots", lambda *args, **kwargs: [])
    exp, layout = write_run(tmp_path)
    with_budgets(layout, BUDGETS)
    md = report(exp, layout).markdown
    rows = table(md, "math · SFT · gsm8k")  # n: 100, 1000 (n = 0 cells record no budget)
    n100, n1000 = rows["n"].index("100"), rows["n"].index("1000")
    delta = rows["Δ (D2LoRA − LoRA)"]
    assert delta[n100].endswith(f" {MARK}") and MARK not in delta[n1000]  # totals 18 vs 10 (×1.8); 108 vs 100
    assert rows["budget LoRA"][n100] == "10 steps · ΣLR 0.01 · 1,000 tokens"
    assert rows["budget D2LoRA"][n100] == "10 + 8 warm-up steps · ΣLR 0.01 + 0.008 · 1,000 + 800 tokens"
    line = (f"{MARK} D2LoRA − LoRA, n = 100: total budgets differ by more than report.budget_ratio = 1.5: "
            "optimizer steps 18 vs 10 (×1.80); summed learning rate 0.018 vs 0.01 (×1.80)")
    assert line in md and md.count(f"{MARK} D2LoRA − LoRA, n = ") == 2  # the gsm8k and the arc_easy table
    # items.csv carries the budgets and the ratio: the rebuilt report marks the same Δs
    report_from_items(layout.report_dir / "items.csv", tmp_path / "rebuilt")
    assert (tmp_path / "rebuilt" / "results.md").read_text() == md
    # at a ratio of 2 the same budgets are within it: nothing is marked, the budgets are still shown
    exp.report.budget_ratio = 2.0
    md = report(exp, layout).markdown
    assert MARK not in md.split("## Task")[1] and "budget D2LoRA" in md
    # a summed rate alone over the ratio marks the Δ too
    with_budgets(layout, {cell: budget(100, 0.1, (0, 0.25)) for cell in BUDGETS if "d2lora-n1000" in cell})
    md = report(exp, layout).markdown
    assert ("n = 1000: total budgets differ by more than report.budget_ratio = 2: summed learning rate 0.35 vs "
            "0.1 (×3.50)") in md


@pytest.mark.parametrize("ratio", [0.5, math.nan, -1])
def test_a_budget_ratio_below_one_is_named_by_its_key(tiny_experiment: dict, ratio: float) -> None:
    tiny_experiment["report"] = {"budget_ratio": ratio}
    with pytest.raises(ConfigError, match=r"report\.budget_ratio: must be a factor >= 1"):
        experiment_from_dict(tiny_experiment)


def test_a_budget_ratio_that_is_not_a_number_is_named_by_its_key(tiny_experiment: dict) -> None:
    tiny_experiment["report"] = {"budget_ratio": "lots"}
    with pytest.raises(ConfigError, match=r"report\.budget_ratio"):
        experiment_from_dict(tiny_experiment)
