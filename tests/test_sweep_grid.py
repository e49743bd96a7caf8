"""The grid: cells, their ids, the n = 0 rule, and what needs the warm-up."""

from __future__ import annotations

import pytest

from d2lora_dist.config import experiment_from_dict, load_experiment
from d2lora_dist.errors import UnknownName
from d2lora_dist.sweep.grid import NO_TRAINING, Cell, find_cell, needs_warmup, plan_cells
from tests.conftest import REPO


def test_demo_grid_compares_both_inits_over_several_seeds_on_a_continuous_task_metric() -> None:
    exp = load_experiment(REPO / "launch/experiments/demo_cpu.yaml")
    cells = plan_cells(exp)
    assert {c.init for c in cells} == {"lora", "d2lora"} and any(c.n == 0 for c in cells)
    trained = [c for c in cells if c.trains]
    assert trained and all(len({c.seed for c in trained if (c.n, c.init) == (t.n, t.init)}) >= 2 for t in trained)
    task = exp.tasks[trained[0].task]
    assert exp.suites[task.suites[0]].kind == "titles" and task.holdout >= 50  # ROUGE on held-out pairs
    assert task.role(task.suites[1]) == "forgetting"


def test_n0_is_one_untrained_cell_per_task_and_init_whatever_the_method_and_seed() -> None:
    assert Cell.requested("math", "dpo", "d2lora", 0, 7) == Cell("math", NO_TRAINING, "d2lora", 0, 0)
    assert Cell.requested("math", "dpo", "d2lora", 8, 7) == Cell("math", "dpo", "d2lora", 8, 7)
    assert not Cell.requested("math", "sft", "lora", 0, 3).trains


def test_cells_are_the_deduplicated_product_in_a_stable_order(tiny_experiment: dict) -> None:
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft", "dpo"], "n": [0, 4], "seeds": [0, 1]},
                               {"task": "math", "methods": ["dpo"], "n": [4, 8], "seeds": [1]}]
    cells = plan_cells(experiment_from_dict(tiny_experiment))
    ids = [c.id for c in cells]
    assert len(ids) == len(set(ids)) == 2 + 2 * 2 * 2 + 2  # n = 0 per init; 2 methods x 2 seeds x 2 inits; n = 8
    assert ids[:2] == ["math-none-d2lora-n0-s0", "math-none-lora-n0-s0"]
    assert ids == [c.id for c in plan_cells(experiment_from_dict(tiny_experiment))]
    assert Cell.from_dict(cells[3].to_dict()) == cells[3]


def test_an_unknown_cell_id_is_named_and_only_d2lora_cells_need_the_warmup(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    with pytest.raises(UnknownName, match="cell 'math-kto-lora-n4-s0' is not in the plan of experiment 'tiny'"):
        find_cell(exp, "math-kto-lora-n4-s0")
    assert find_cell(exp, "math-sft-d2lora-n4-s0").init == "d2lora"
    assert not needs_warmup([c for c in plan_cells(exp) if c.init == "lora"])
    assert needs_warmup(plan_cells(exp))


def test_a_block_can_restrict_its_cells_to_some_suites_and_overlapping_blocks_take_the_union(
        tiny_experiment: dict) -> None:
    from d2lora_dist.config import ConfigError
    from d2lora_dist.sweep.grid import cell_suites

    tiny_experiment["grid"] = [
        {"task": "math", "methods": ["sft"], "n": [0, 8], "seeds": [0]},                      # every suite
        {"task": "math", "methods": ["sft"], "n": [4, 8], "seeds": [0], "suites": ["gsm8k"]}]  # task metric only
    exp = experiment_from_dict(tiny_experiment)
    by_id = {c.id: c for c in plan_cells(exp)}
    assert cell_suites(exp, by_id["math-sft-lora-n4-s0"]) == ["gsm8k"]
    assert cell_suites(exp, by_id["math-sft-lora-n8-s0"]) == exp.tasks["math"].suites == ["gsm8k", "arc_easy"]
    assert cell_suites(exp, by_id["math-none-lora-n0-s0"]) == ["gsm8k", "arc_easy"]
    restricted = by_id["math-sft-d2lora-n4-s0"]
    assert restricted.to_dict()["suites"] == ["gsm8k"] and "suites" not in by_id["math-sft-d2lora-n8-s0"].to_dict()
    assert Cell.from_dict(restricted.to_dict()).suites == ("gsm8k",)

    tiny_experiment["grid"][1]["suites"] = ["arc_easy", "titles"]
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(tiny_experiment)
    assert "grid[1].suites: 'titles' is not a suite of task 'math'" in str(err.value)
    assert "grid[1].suites: must keep the task metric 'gsm8k' of task 'math'" in str(err.value)
