"""The report of an experiment with the control arms, on hand-written cells: each control is paired with
LoRA like D2LoRA, D2LoRA is paired with each control, and a section prints D2LoRA − control under what
the control rules out."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.report import report
from d2lora_dist.report.arms import Pair, pairs_of
from d2lora_dist.sweep.grid import plan_cells
from tests.test_report_axes import table, write_titles_cell

M = 40
BASE = 0.30
# over vanilla LoRA at n = 16: lora_matched catches up with D2LoRA (steps explain it), the others do not
GAIN = {"lora": 0.0, "d2lora": 0.04, "lora_matched": 0.04, "d2lora_placebo": 0.0, "random_b": 0.0}
INITS = list(GAIN)


@pytest.fixture
def no_plots(monkeypatch):
    monkeypatch.setattr("d2lora_dist.report.write_plots", lambda *args, **kwargs: [])


def experiment(tmp_path: Path):
    return experiment_from_dict({
        "name": "controls", "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": "model-dir", "dtype": "float32"},
        "warmup": {"dataset": {"name": "orpo_dpo_mix", "data_files": ["warm.jsonl"]}, "n": 64,
                   "train": {"learning_rate": 1e-4, "epochs": 1, "global_batch_size": 8}},
        "tasks": {"titles": {"dataset": {"name": "econ_abstracts", "data_files": ["titles.jsonl"]}, "holdout": M,
                             "suites": ["titles"]}},
        "suites": {"titles": {"kind": "titles"}},
        "methods": {"sft": {"learning_rate": 1e-4, "epochs": 1, "global_batch_size": 4}},
        "grid": [{"task": "titles", "methods": ["sft"], "inits": INITS, "n": [0, 16], "seeds": [0, 1, 2]}],
        "report": {"min_seeds": 3}, "tracking": {"mode": "disabled"}}, "controls.yaml")


def write_results(exp) -> None:
    layout = RunLayout(exp.run_dir)
    for cell in plan_cells(exp):
        scores = [BASE + (0.05 if i % 2 else -0.05) for i in range(M)]
        if cell.n > 0:  # the gain, plus ±0.03 noise that cancels over items and differs by seed
            scores = [s + GAIN[cell.init] + (0.03 if (i + cell.seed + INITS.index(cell.init)) % 4 < 2 else -0.03)
                      for i, s in enumerate(scores)]
        write_titles_cell(exp, layout, cell, scores)


def test_controls_are_paired_with_lora_and_d2lora_with_each_control():
    assert pairs_of(INITS) == [Pair("lora", "d2lora"), Pair("lora", "lora_matched"), Pair("lora", "d2lora_placebo"),
                               Pair("lora", "random_b"), Pair("lora_matched", "d2lora"),
                               Pair("d2lora_placebo", "d2lora"), Pair("random_b", "d2lora")]
    assert pairs_of(["lora", "d2lora@m64", "random_b@m64", "random_b@m192"])[-1] == Pair("random_b@m64", "d2lora@m64")
    assert pairs_of(["lora", "d2lora"]) == [Pair("lora", "d2lora")]  # without controls: the one pair


def test_report_prints_d2lora_against_each_control_under_what_it_rules_out(tmp_path, no_plots):
    exp = experiment(tmp_path)
    write_results(exp)
    markdown = report(exp, RunLayout(exp.run_dir)).markdown
    rows = table(markdown, "titles · SFT · titles (task suite)")
    assert {"ROUGE-L LoRA (matched steps)", "ROUGE-L D2LoRA (placebo warm-up)", "ROUGE-L Random B"} <= set(rows)
    assert rows["ROUGE-L LoRA (matched steps)"][0] == rows["ROUGE-L LoRA"][0] == "30.00"  # n = 0: the base model
    assert rows["ROUGE-L Random B"][0] == "—"  # no untrained random-B cell
    assert "one warm-up draw" in markdown.split("## Task:", 1)[0]
    section = markdown.split("## D2LoRA against each control", 1)[1].split("\n## ", 1)[0]
    headings = [line for line in section.splitlines() if line.startswith("### ")]
    assert headings == ["### Rules out more optimizer steps: LoRA (matched steps)",
                        "### Rules out any warm-up of this size, not its data: D2LoRA (placebo warm-up)",
                        "### Rules out B ≠ 0 at the start: Random B"]
    by_control = dict(zip(headings, section.split("### ")[1:], strict=True))
    matched = by_control[headings[0]].split("| Δ | ")[1].split(" |")[0]
    placebo = by_control[headings[1]].split("| Δ | ")[1].split(" |")[0]
    assert matched.startswith("+0.00 [") and "unresolved" in matched, matched  # steps explain the gain here
    assert placebo.startswith("**+4.00** [+") and "· 3 seeds × 40 items · MDE" in placebo and "· resolved" in placebo
    assert rows["ROUGE-L Δ (D2LoRA − D2LoRA (placebo warm-up))"][1] == placebo  # the same Δ as in the table
