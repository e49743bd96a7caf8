"""Running cells: idempotent, n = 0 without training, resumable after a crash mid-training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import TrainerCallback

from d2lora_dist import adapters
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.cell import run_cell
from d2lora_dist.sweep.grid import Cell
from d2lora_dist.warmup import run_warmup


class CrashAtStep(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


@pytest.fixture
def run(tiny_experiment: dict):
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    run_warmup(exp, layout)
    return exp, layout


def test_cell_writes_result_last_and_a_second_run_does_nothing(run) -> None:
    exp, layout = run
    cell = Cell("math", "sft", "d2lora", 4, 0)
    result = run_cell(exp, layout, cell)
    files = {p.relative_to(layout.cell_dir(cell.id)).as_posix() for p in layout.cell_dir(cell.id).rglob("*")
             if p.is_file()}
    assert {"result.json", "subset.json", "adapter/manifest.json", "predictions/gsm8k.jsonl",
            "predictions/arc_easy.jsonl"} <= files
    assert not layout.cell_checkpoints(cell.id).exists()  # removed after success
    assert result["adapter"]["parent_sha256"] == adapters.read_manifest(layout.warmup_adapter)["adapter_sha256"]
    assert 0.0 <= result["metrics"]["gsm8k"]["accuracy"] <= 1.0 and result["metrics"]["gsm8k"]["items"] == 4
    assert result["suites"] == {"gsm8k": "task", "arc_easy": "forgetting"}
    subset = json.loads(layout.cell_subset(cell.id).read_text())
    assert subset["n"] == 4 and len(subset["indices"]) == 4
    stamp = layout.cell_result(cell.id).stat().st_mtime_ns
    assert run_cell(exp, layout, cell) == result
    assert layout.cell_result(cell.id).stat().st_mtime_ns == stamp


def test_n0_cells_train_nothing(run) -> None:
    exp, layout = run
    base = run_cell(exp, layout, Cell("math", "none", "lora", 0, 0))
    warm = run_cell(exp, layout, Cell("math", "none", "d2lora", 0, 0))
    assert base["train"] is None and base["adapter"] is None
    assert warm["train"] is None
    assert warm["adapter"]["sha256"] == adapters.read_manifest(layout.warmup_adapter)["adapter_sha256"]
    assert not layout.cell_adapter("math-none-d2lora-n0-s0").exists()


def test_titles_evaluate_the_holdout_never_trained_on(run) -> None:
    exp, layout = run
    cell = Cell("titles", "sft", "lora", 6, 0)
    result = run_cell(exp, layout, cell)
    subset = json.loads(layout.cell_subset(cell.id).read_text())
    rows = [json.loads(line) for line in layout.cell_predictions(cell.id, "titles").read_text().splitlines()]
    assert len(rows) == 4 and set(result["metrics"]["titles"]) >= {"rouge1", "rouge2", "rougeL"}
    trained_titles = {f"Adapters {i} for small models" for i in subset["indices"]}
    assert not trained_titles & {r["reference"] for r in rows}


def test_a_crashed_cell_resumes_from_its_last_checkpoint(run) -> None:
    exp, layout = run
    cell = Cell("math", "dpo", "lora", 8, 0)  # 4 steps at batch 2, checkpoints every 2
    with pytest.raises(RuntimeError, match="simulated crash at step 3"):
        run_cell(exp, layout, cell, callbacks=[CrashAtStep(3)])
    assert not layout.cell_result(cell.id).exists()
    assert (layout.cell_checkpoints(cell.id) / "checkpoint-2").is_dir()
    result = run_cell(exp, layout, cell)
    assert result["train"]["steps"] == 4
    assert layout.cell_result(cell.id).is_file() and not layout.cell_checkpoints(cell.id).exists()


def test_d2lora_cell_without_warmup_says_what_to_run(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    with pytest.raises(FileNotFoundError, match="needs the warm-up adapter.*d2lora warmup"):
        run_cell(exp, RunLayout(exp.run_dir), Cell("math", "dpo", "d2lora", 4, 0))


def test_changed_task_data_is_refused_for_a_started_cell(run, tiny_data: dict, tmp_path: Path) -> None:
    exp, layout = run
    cell = Cell("math", "sft", "lora", 4, 0)
    layout.cell_subset(cell.id).parent.mkdir(parents=True)
    layout.cell_subset(cell.id).write_text(json.dumps({"sha256": "something else"}))
    with pytest.raises(ValueError, match="the task data changed since this cell started"):
        run_cell(exp, layout, cell)
    assert json.loads(layout.cell_subset(cell.id).read_text()) == {"sha256": "something else"}
