"""Running cells: idempotent, n = 0 without training, resumable after a crash mid-training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from d2lora_dist import adapters
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.provenance import code_version
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
    assert result["n_trained"] == 4  # no prompt fills max_length
    assert result["code"] == code_version() and result["code"]["version"].startswith(("git:", "d2lora-dist=="))
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
    assert base["n_trained"] == warm["n_trained"] == 0
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


def test_result_records_the_rows_trained_after_the_length_filter(tiny_experiment: dict) -> None:
    from transformers import AutoTokenizer

    from d2lora_dist.data.lengths import record_lengths
    from d2lora_dist.data.selection import task_records

    exp = experiment_from_dict(tiny_experiment)
    tokenizer = AutoTokenizer.from_pretrained(exp.model.name_or_path)
    records, _ = task_records(exp, "math", "sft", 8, 0)
    prompts = sorted(record_lengths(r, tokenizer)[0] for r in records)
    limit = prompts[len(prompts) // 2]  # rows whose prompt reaches it are dropped: some, not all
    assert prompts[0] < limit, "the fixture's prompts must differ in length"
    tiny_experiment["methods"]["sft"]["max_length"] = limit
    exp = experiment_from_dict(tiny_experiment)
    result = run_cell(exp, RunLayout(exp.run_dir), Cell("math", "sft", "lora", 8, 0))
    assert result["n_trained"] == sum(p < limit for p in prompts) < 8


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


class LoraAtStart(TrainerCallback):
    """The trainable LoRA tensors as training begins (after the optimizer exists, before step 1)."""

    def __init__(self) -> None:
        self.state: dict = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = adapters.gathered_state_dict(model)


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


@pytest.mark.parametrize("method", ["sft", "dpo", "orpo"])
def test_a_d2lora_cell_starts_training_from_the_warmup_tensors_bit_for_bit(run, method: str) -> None:
    from safetensors.torch import load_file

    exp, layout = run
    start = LoraAtStart()
    run_cell(exp, layout, Cell("math", method, "d2lora", 4, 0), callbacks=[start])
    warmup = load_file(str(layout.warmup_adapter / adapters.WEIGHTS))
    assert start.state.keys() == warmup.keys()
    assert all(torch.equal(start.state[k], warmup[k]) for k in warmup)
    assert any(torch.count_nonzero(v) for k, v in warmup.items() if "lora_B" in k)  # not a fresh adapter


def test_a_lora_cell_starts_from_a_fresh_adapter(run) -> None:
    exp, layout = run
    start = LoraAtStart()
    run_cell(exp, layout, Cell("math", "sft", "lora", 4, 0), callbacks=[start])
    assert all(not torch.count_nonzero(v) for k, v in start.state.items() if "lora_B" in k)


def test_an_interrupted_cell_resumes_only_its_remaining_steps_to_the_same_adapter(tiny_experiment: dict) -> None:
    tiny_experiment["lora"]["dropout"] = 0.1  # the restored RNG state must matter too
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    cell = Cell("math", "dpo", "lora", 8, 0)  # 4 steps at batch 2, checkpoints every 2
    with pytest.raises(RuntimeError, match="simulated crash at step 3"):
        run_cell(exp, layout, cell, callbacks=[CrashAtStep(3)])
    resumed = StepCounter()
    result = run_cell(exp, layout, cell, callbacks=[resumed])
    assert resumed.steps == 2 and result["train"]["steps"] == 4  # steps 3 and 4 only
    other = RunLayout(exp.run_dir.parent / "uninterrupted")
    run_cell(exp, other, cell)
    # bit for bit: one code path, here twice; the checkpoint restores weights, optimizer and RNG exactly
    assert (adapters.read_manifest(layout.cell_adapter(cell.id))["adapter_sha256"]
            == adapters.read_manifest(other.cell_adapter(cell.id))["adapter_sha256"])


def test_a_failing_second_suite_leaves_no_result(run, tmp_path: Path) -> None:
    exp, layout = run
    broken = tmp_path / "arc_without_answers.jsonl"
    broken.write_text(json.dumps({"id": "a", "question": "Q?", "choices": {"text": ["x", "y"], "label": ["A", "B"]},
                                  "answerKey": "Z"}) + "\n")
    exp.suites["arc_easy"].dataset.data_files = [str(broken)]
    cell = Cell("math", "sft", "lora", 4, 0)
    with pytest.raises(ValueError, match="no items to evaluate"):
        run_cell(exp, layout, cell)
    assert layout.cell_predictions(cell.id, "gsm8k").is_file()  # the first suite ran
    assert not layout.cell_result(cell.id).exists()


def test_a_cell_whose_lora_config_differs_from_its_warmup_stops(run) -> None:
    exp, layout = run
    exp.lora.alpha = exp.lora.alpha * 2  # same shapes: only the recorded config can tell
    with pytest.raises(adapters.AdapterError, match="different LoRA config; alpha: adapter has 8, this run has 16"):
        run_cell(exp, layout, Cell("math", "sft", "d2lora", 4, 0))
    assert not layout.cell_result("math-sft-d2lora-n4-s0").exists()


def test_a_cell_on_another_base_model_than_its_warmup_stops(run, tmp_path: Path) -> None:
    from tests.evaluate_fixtures import build_tiny_llama, build_tiny_tokenizer

    exp, layout = run
    other = tmp_path / "other_tiny_llama"  # the same architecture and shapes, other weights
    tokenizer = build_tiny_tokenizer()
    build_tiny_llama(tokenizer, seed=1).save_pretrained(other)
    tokenizer.save_pretrained(other)
    exp.model.name_or_path = str(other)
    with pytest.raises(adapters.AdapterError, match="different base model"):
        run_cell(exp, layout, Cell("math", "sft", "d2lora", 4, 0))


def test_a_checkpoint_interrupted_while_saving_is_skipped_for_the_one_before(run) -> None:
    exp, layout = run
    cell = Cell("math", "dpo", "lora", 8, 0)  # 4 steps at batch 2, checkpoints every 2
    with pytest.raises(RuntimeError, match="simulated crash at step 3"):
        run_cell(exp, layout, cell, callbacks=[CrashAtStep(3)])
    partial = layout.cell_checkpoints(cell.id) / "checkpoint-3"  # killed while saving: no trainer_state.json
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"")
    resumed = StepCounter()
    result = run_cell(exp, layout, cell, callbacks=[resumed])
    assert resumed.steps == 2 and result["train"]["steps"] == 4  # from checkpoint-2
