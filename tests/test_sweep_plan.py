"""The frozen plan: experiment.yaml and plan.json written once; array index i is cell i."""

from __future__ import annotations

import json

import pytest

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.plan import PlanError, cell_at, freeze_plan, load_plan


def test_the_plan_is_frozen_once_and_maps_array_indices_to_cells(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    cells = freeze_plan(exp, layout)
    assert load_plan(layout) == cells and cell_at(layout, 2) == cells[2]
    assert json.loads(layout.plan_file.read_text())["cells"][0]["id"] == cells[0].id
    assert freeze_plan(exp, layout) == cells  # the same experiment: idempotent
    with pytest.raises(PlanError, match=f"array index {len(cells)} outside the frozen plan of {len(cells)} cells"):
        cell_at(layout, len(cells))


def test_a_changed_experiment_cannot_reuse_a_frozen_run_directory(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    freeze_plan(exp, layout)
    frozen = layout.experiment_file.read_text()
    tiny_experiment["methods"]["sft"]["learning_rate"] = 0.5
    with pytest.raises(PlanError, match=r"methods.sft.learning_rate: 0.001 -> 0.5"):
        freeze_plan(experiment_from_dict(tiny_experiment), layout)
    assert layout.experiment_file.read_text() == frozen  # nothing overwritten


def test_the_token_estimate_counts_every_token_of_prompt_and_response(tiny_experiment: dict) -> None:
    """Against a count by pieces: the chat template's four special tokens, then each text piece
    between them (special tokens split the text, so the pieces' counts add up)."""
    from d2lora_dist.data.loading import normalize
    from d2lora_dist.modeling import load_tokenizer
    from d2lora_dist.sweep.plan import measure_workload

    exp = experiment_from_dict(tiny_experiment)
    per_task, items = measure_workload(exp)
    tokenizer = load_tokenizer(exp.model)

    def n(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    records = list(normalize(exp.tasks["titles"].dataset, "sft").records.values())
    by_pieces = [4 + n("\n" + r["prompt"][0]["content"]) + n("\n") + n("\n" + r["completion"][0]["content"]) + n("\n")
                 for r in records]
    assert per_task["titles"] == sum(by_pieces) / len(by_pieces) > 20  # not 2 per example
    assert items == {"gsm8k": 4, "arc_easy": 4, "titles": 4}
