"""The `report` section: a primary comparison must name a Δ the grid has (every problem named by its key),
and the section may change after the plan is frozen (it judges results, it does not make them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.report.verdicts import primary_keys
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep.plan import PlanError, freeze_plan

DEMO = Path(__file__).resolve().parents[1] / "launch" / "experiments" / "demo_cpu.yaml"
AXES = DEMO.with_name("axes_cpu.yaml")


DEMO_N = [0, 16]  # the demo grid's n in these tests, whatever the shipped demo trains on


def load(path: Path, report: dict, tmp_path: Path):
    data = yaml.safe_load(path.read_text())
    if path == DEMO:
        data["grid"][0]["n"] = DEMO_N
    data["output_dir"] = str(tmp_path)
    data["report"] = report
    return experiment_from_dict(data, path.name)


@pytest.mark.parametrize(("primary", "problem"), [
    ({"task": "titles", "method": "sft", "n": 32, "metric": "rougeL"},
     "report.primary[0].n: the grid runs task 'titles' method 'sft' at n = [0, 16], not 32"),
    ({"task": "titles", "method": "dpo", "n": 16, "metric": "rougeL"},
     "report.primary[0].method: no grid block of task 'titles' runs method 'dpo'"),
    ({"task": "math", "method": "sft", "n": 16, "metric": "rougeL"},
     "report.primary[0].task: unknown task 'math' (defined: ['titles'])"),
    ({"task": "titles", "method": "sft", "n": 16, "metric": "bleu"},
     "report.primary[0].metric: suite 'titles' reports no 'bleu' (valid: rouge1, rouge2, rougeL, bare_title)"),
    ({"task": "titles", "method": "sft", "n": 16, "metric": "accuracy", "suite": "gsm8k"},
     "report.primary[0].suite: 'gsm8k' is not a suite of task 'titles' (['titles', 'arc_easy'])"),
    ({"task": "titles", "method": "sft", "n": 16, "metric": "rougeL", "warmup": "m64"},
     "report.primary[0].warmup: 'm64' is not a warm-up of these cells (warmup)"),
    ({"task": "titles", "method": "sft", "n": 16, "metric": "rougeL", "lora_init": "pissa"},
     "report.primary[0]: no grid block runs both LoRA and D2LoRA cells of titles sft n=16 with suite 'titles' "
     "and LoRA init 'pissa'"),
])
def test_a_primary_comparison_the_grid_lacks_is_named_by_its_key(tmp_path, primary, problem):
    with pytest.raises(ConfigError) as e:
        load(DEMO, {"primary": [{"task": "titles", "method": "sft", "n": 16, "metric": "rougeL"}, primary]}, tmp_path)
    assert [p.replace("[1]", "[0]") for p in e.value.problems] == [problem]


def test_other_report_settings_are_checked_together(tmp_path):
    with pytest.raises(ConfigError) as e:
        load(DEMO, {"min_seeds": 1, "target_effect": {"rouge": 2.0, "titles": 0.0}}, tmp_path)
    assert e.value.problems == [
        "report.min_seeds: must be >= 2 (one seed says nothing about seed-to-seed variation), got 1",
        "report.target_effect.rouge: not a suite kind (valid: gsm8k, titles, arc)",
        "report.target_effect.titles: must be > 0 points, got 0.0"]


def test_several_warmups_need_the_primary_to_name_one_and_its_key_names_the_arms(tmp_path):
    with pytest.raises(ConfigError, match=r"report.primary\[0\].warmup: the grid has several warm-ups here "
                                          r"\(m192, m64\); name the one compared"):
        load(AXES, {"primary": [{"task": "titles", "method": "sft", "n": 16, "metric": "rougeL"}]}, tmp_path)
    exp = load(AXES, {"primary": [{"task": "titles", "method": "sft", "n": 16, "metric": "rougeL", "warmup": "m64",
                                   "lora_init": "pissa"}]}, tmp_path)
    assert primary_keys(exp) == {("titles", "sft", 16, "titles", "rougeL", "d2lora@m64+pissa", "lora+pissa")}
    single = load(DEMO, {"primary": [{"task": "titles", "method": "sft", "n": 16, "metric": "rougeL"}]}, tmp_path)
    assert primary_keys(single) == {("titles", "sft", 16, "titles", "rougeL", "d2lora", "lora")}


def test_the_report_section_may_change_after_the_plan_is_frozen_but_the_grid_may_not(tmp_path):
    first = load(DEMO, {}, tmp_path)
    freeze_plan(first, RunLayout(first.run_dir))
    later = load(DEMO, {"min_seeds": 3, "primary": [{"task": "titles", "method": "sft", "n": 16, "metric": "rouge1"}]},
                 tmp_path)
    freeze_plan(later, RunLayout(later.run_dir))  # no PlanError
    data = yaml.safe_load(DEMO.read_text()) | {"output_dir": str(tmp_path)}
    data["grid"][0]["n"], data["report"] = DEMO_N, {}
    data["grid"][0]["seeds"] = [0, 1, 2]
    with pytest.raises(PlanError, match=r"grid\[0\]\.seeds"):
        freeze_plan(experiment_from_dict(data, "demo"), RunLayout(first.run_dir))
