"""Tuned arms: selection cells score each setting on the validation split only; the best runs on the tests."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.data import selection
from d2lora_dist.errors import MissingInput
from d2lora_dist.fileio import write_json_atomic
from d2lora_dist.layout import RunLayout
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep import slurm
from d2lora_dist.sweep.cell import run_cell
from d2lora_dist.sweep.grid import plan_cells
from d2lora_dist.sweep.plan import freeze_plan, load_plan
from d2lora_dist.sweep.pool import JobQueue
from d2lora_dist.sweep.tuning import validation_scores

LRS = [1e-2, 1e-4, 1e-3]


def tuned_dict(data: dict, tmp_path: Path) -> dict:
    """titles with 6 validation rows; one LoRA arm at n = 2 tuned over three learning rates on tune seeds 0, 1."""
    arc = tmp_path / "arc_copy.jsonl"  # the forgetting suite's own file: a test of this module may hide it
    arc.write_text(Path(data["suites"]["arc_easy"]["dataset"]["data_files"][0]).read_text())
    data["suites"]["arc_easy"]["dataset"]["data_files"] = [str(arc)]
    data["tasks"]["titles"]["validation"] = 6
    data["suites"]["titles_val"] = {"kind": "titles", "split": "validation", "limit": 2, "batch_size": 4,
                                    "max_new_tokens": 4}
    data["suites"]["titles"] |= {"limit": 2, "max_new_tokens": 4}
    data["suites"]["arc_easy"]["limit"] = 2
    data["grid"] = [{"task": "titles", "methods": ["sft"], "inits": ["lora"], "n": [2], "seeds": [0, 1],
                     "tune": {"suite": "titles_val", "learning_rate": list(LRS), "seeds": [0, 1]}}]
    return data


def test_plan_has_a_selection_cell_per_setting_and_tune_seed_before_the_final_cells(tiny_experiment, tmp_path):
    exp = experiment_from_dict(tuned_dict(tiny_experiment, tmp_path))
    cells = freeze_plan(exp, RunLayout(exp.run_dir))
    ids = [c.id for c in cells]
    assert ids[-2:] == ["titles-sft-lora-n2-s0", "titles-sft-lora-n2-s1"]  # finals after what they wait for
    assert sorted(ids[:-2]) == sorted(f"titles-sft-lora-n2-tune-lr{lr}-s{s}" for lr in ("1e-2", "1e-4", "1e-3")
                                      for s in (0, 1))
    assert all(c.suites == ("titles_val",) and c.selects for c in cells[:-2])
    assert all(c.tuned and not c.suites for c in cells[-2:])
    assert load_plan(RunLayout(exp.run_dir)) == cells  # the frozen plan keeps setting and block
    assert [c.tune for c in load_plan(RunLayout(exp.run_dir))] == [0] * len(cells)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["grid"][0]["tune"].update(learning_rate=[]), r"grid\[0\]\.tune\.learning_rate: empty"),
    (lambda d: d["grid"][0]["tune"].update(learning_rate=None), r"grid\[0\]\.tune: no axis to tune"),
    (lambda d: d["grid"][0]["tune"].update(min_steps=[-1]), r"grid\[0\]\.tune\.min_steps: -1 must be >= 0"),
    (lambda d: d["grid"][0]["tune"].update(seeds=[0, 0]), r"grid\[0\]\.tune\.seeds: \[0, 0\] repeats"),
    (lambda d: d["grid"][0]["tune"].update(suite="titles"), r"grid\[0\]\.tune\.suite: 'titles' evaluates the test"),
    (lambda d: d["grid"][0]["tune"].update(suite="nope"), r"grid\[0\]\.tune\.suite: unknown suite 'nope'"),
    (lambda d: d["grid"][0]["tune"].update(metric="accuracy"), r"grid\[0\]\.tune\.metric: suite 'titles_val'"),
    (lambda d: d["tasks"]["titles"].update(validation=0), r"grid\[0\]\.tune\.suite: task 'titles' holds out no"),
    (lambda d: d["tasks"]["titles"].update(validation=-2), r"tasks\.titles\.validation: must be >= 0"),
    (lambda d: d["tasks"]["math"].update(validation=4), r"tasks\.math\.validation: dataset 'math_step_dpo' has no"),
    (lambda d: d["suites"]["titles_val"].update(dataset=d["suites"]["arc_easy"]["dataset"]),
     r"suites\.titles_val\.dataset: a split: validation suite"),
])
def test_bad_tuning_and_validation_settings_name_their_key(tiny_experiment, tmp_path, change, message):
    data = tuned_dict(tiny_experiment, tmp_path)
    change(data)
    with pytest.raises(ConfigError, match=message):
        experiment_from_dict(data)


def test_a_tuned_cell_planned_by_another_block_too_is_refused(tiny_experiment, tmp_path):
    data = tuned_dict(tiny_experiment, tmp_path)
    data["grid"].append({"task": "titles", "methods": ["sft"], "inits": ["lora"], "n": [2], "seeds": [1]})
    with pytest.raises(ConfigError, match=r"grid\[0\]\.tune: cell titles-sft-lora-n2-s1 is also planned by grid\[1\]"):
        plan_cells(experiment_from_dict(data))


def _fake_selection(layout: RunLayout, exp, scores: dict[str, list[float]], test: dict[str, float]) -> None:
    """Selection results as a finished selection cell writes them, plus a test-suite number that favours
    another setting (a choice that read it would pick that one)."""
    for cell in plan_cells(exp):
        if cell.selects:
            value = scores[cell.setting][cell.seed]
            write_json_atomic(layout.cell_result(cell.id), {"metrics": {"titles_val": {"rougeL": value},
                                                                        "titles": {"rougeL": test[cell.setting]}}})


def test_the_setting_with_the_best_mean_validation_score_is_chosen_ties_to_the_smaller_rate(tiny_experiment, tmp_path):
    exp = experiment_from_dict(tuned_dict(tiny_experiment, tmp_path))
    layout = RunLayout(exp.run_dir)
    final = next(c for c in plan_cells(exp) if c.tuned)
    with pytest.raises(MissingInput, match="selection cell titles-sft-lora-n2-tune-lr1e-2-s0"):
        validation_scores(exp, layout, final)
    # lr1e-3 has the best mean (0.30), though lr1e-2 has the best single seed and the best test score
    _fake_selection(layout, exp, {"lr1e-2": [0.50, 0.0], "lr1e-4": [0.20, 0.20], "lr1e-3": [0.30, 0.30]},
                    {"lr1e-2": 0.9, "lr1e-4": 0.1, "lr1e-3": 0.1})
    choice = validation_scores(exp, layout, final)
    assert choice.chosen.label == "lr1e-3" and choice.metric == "rougeL" and choice.mean("lr1e-4") == 0.2
    _fake_selection(layout, exp, {"lr1e-2": [0.3, 0.3], "lr1e-4": [0.3, 0.3], "lr1e-3": [0.1, 0.1]},
                    {"lr1e-2": 0.9, "lr1e-4": 0.1, "lr1e-3": 0.1})
    assert validation_scores(exp, layout, final).chosen.label == "lr1e-4"  # a tie: the smaller learning rate


def test_selection_never_reads_test_items_and_only_the_chosen_setting_runs_on_the_tests(
        tiny_experiment, tmp_path, monkeypatch):
    data = tuned_dict(tiny_experiment, tmp_path)
    data["grid"][0]["seeds"] = [0]
    data["grid"][0]["tune"] |= {"learning_rate": [1e-4, 5e-2], "seeds": [0]}
    exp = experiment_from_dict(data)
    layout = RunLayout(exp.run_dir)
    cells = freeze_plan(exp, layout)
    final = next(c for c in cells if c.tuned)
    with pytest.raises(MissingInput, match="run `d2lora sweep cell --cell titles-sft-lora-n2-tune-lr1e-4-s0`"):
        run_cell(exp, layout, final)
    # the test items: the titles holdout (read through holdout_indices) and the forgetting suite's file
    arc = Path(data["suites"]["arc_easy"]["dataset"]["data_files"][0])
    arc.rename(arc.with_suffix(".away"))

    def test_items_read(*args, **kwargs):
        raise AssertionError("a selection cell read the test holdout")

    with monkeypatch.context() as patch:
        patch.setattr(selection, "holdout_indices", test_items_read)
        results = {c.setting: run_cell(exp, layout, c) for c in cells if c.selects}
    arc.with_suffix(".away").rename(arc)
    validation = json.loads(layout.validation_file("titles").read_text())
    titles = {f"Adapters {i} for small models" for i in validation["indices"]}
    for setting, result in results.items():
        assert set(result["metrics"]) == {"titles_val"}
        cell_id = f"titles-sft-lora-n2-tune-{setting}-s0"
        refs = {json.loads(line)["reference"] for line in layout.cell_predictions(cell_id, "titles_val").open()}
        assert len(refs) == 2 and refs <= titles
        assert not set(json.loads(layout.cell_subset(cell_id).read_text())["indices"]) & set(validation["indices"])
    scores = {s: r["metrics"]["titles_val"]["rougeL"] for s, r in results.items()}
    best = max(scores, key=lambda s: (scores[s], -float(s.removeprefix("lr"))))  # ties: the smaller rate
    result = run_cell(exp, layout, final)
    assert result["tuning"]["selected"]["label"] == best and result["tuning"]["role"] == "final"
    rate = {"lr1e-4": 1e-4, "lr5e-2": 5e-2}[best]
    assert json.loads((layout.cell_adapter(final.id) / "manifest.json").read_text())["hyperparameters"][
        "learning_rate"] == rate
    assert set(result["metrics"]) == {"titles", "arc_easy"}  # the test suites, on the final cell alone
    assert json.loads(layout.tuning_file("titles-sft-lora-n2").read_text())["selected"]["label"] == best
    finals = [p.name for p in layout.cells_dir.iterdir() if "-tune-" not in p.name]
    assert finals == [final.id]  # no other setting ran on the test suites


def test_a_final_cell_waits_for_its_selection_cells_and_a_failed_one_holds_it_back(tiny_experiment, tmp_path):
    exp = experiment_from_dict(tuned_dict(tiny_experiment, tmp_path))
    cells = plan_cells(exp)
    final = next(c for c in cells if c.tuned)
    picks = [c for c in cells if c.selects]
    after = {final.id: [c.id for c in picks]}
    queue = JobQueue([], [final, *picks], threading.Event(), after=lambda c: after.get(c.id, []))
    taken = [queue.take() for _ in picks]
    assert taken == picks  # the final cell is passed over while its selection cells run
    for cell in picks[:-1]:
        assert queue.cell_ended(cell, True) == []
    assert queue.left() == [final]
    assert queue.cell_ended(picks[-1], True) == [] and queue.take() == final
    queue = JobQueue([], [final, *picks], threading.Event(), after=lambda c: after.get(c.id, []))
    first = queue.take()
    assert queue.cell_ended(first, False) == [final] and final in queue.held_back
    assert [queue.take() for _ in picks[1:]] == picks[1:] and queue.take() is None


def test_slurm_runs_the_final_cells_in_an_array_after_the_selection_array(tiny_experiment, tmp_path):
    exp = experiment_from_dict(tuned_dict(tiny_experiment, tmp_path))
    layout = RunLayout(exp.run_dir)
    cells = freeze_plan(exp, layout)
    steps, _ = slurm.plan_submission(exp, layout, cells, range(len(cells)))
    assert [(s.name, s.after) for s in steps] == [
        ("array:select", None), ("array:final", ("afterok", ("array:select",))),
        ("report", ("afterany", ("array:select", "array:final")))]
    assert [cells[i].tuned for i in steps[1].indices] == [True, True]
    assert "cells-final" in steps[1].text and "--array=6-7%" in steps[1].text
    done = [i for i, c in enumerate(cells) if c.selects]
    for i in done:
        write_json_atomic(layout.cell_result(cells[i].id), {})
    steps, _ = slurm.plan_submission(exp, layout, cells, slurm.unfinished_indices(layout, cells))
    assert [(s.name, s.after) for s in steps][0] == ("array:final", None)  # its selection is done


def test_with_a_warmup_per_seed_each_final_array_waits_for_the_select_array_of_its_tune_seeds(tiny_experiment,
                                                                                              tmp_path):
    """Selection cells train from their own seed's warm-up, so they sit in that warm-up's select array; the
    final cells of every other seed wait for it too, and it is submitted before them (sbatch needs its id)."""
    data = tuned_dict(tiny_experiment, tmp_path)
    data["warmup"] |= {"seeds": "per_cell"}
    data["grid"][0] |= {"inits": ["d2lora"], "seeds": [0, 1]}
    data["grid"][0]["tune"] |= {"seeds": [1], "learning_rate": [1e-4, 1e-3]}  # tune seed 1: ahead of seed 0
    exp = experiment_from_dict(data)
    layout = RunLayout(exp.run_dir)
    cells = freeze_plan(exp, layout)
    steps, _ = slurm.plan_submission(exp, layout, cells, range(len(cells)))
    order = [s.name for s in steps]
    finals = [s for s in steps if s.name.endswith("-final")]
    assert {s.name for s in finals} == {"array:warmup-s0-final", "array:warmup-s1-final"}
    for final in finals:
        assert "array:warmup-s1-select" in final.after[1], (final.name, final.after)
        assert all(order.index(dep) < order.index(final.name) for dep in final.after[1] if dep in order)
