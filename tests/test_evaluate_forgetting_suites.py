"""Several forgetting suites in one task and one grid block (ARC-Easy and ARC-Challenge beside GSM8K): the plan
counts each, a cell evaluates and records each, and `d2lora score` reproduces each result from its predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2lora_dist.cli import main
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.cell import run_cell
from d2lora_dist.sweep.grid import Cell, cell_suites, plan_cells
from d2lora_dist.sweep.plan import measure_workload


def _challenge_rows() -> list[dict]:
    # the hub's ARC-Challenge schema, numeric labels as some of its items have
    return [{"id": f"Mercury_{i}", "question": f"Which planet is number {i}?",
             "choices": {"text": [f"planet {i}", f"moon {i}", f"star {i}", f"comet {i}"], "label": ["1", "2", "3", "4"]},
             "answerKey": "2"} for i in range(5)]


def test_a_block_with_two_forgetting_suites_plans_runs_and_rescores_each(tiny_experiment: dict, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "arc_challenge.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in _challenge_rows()))
    tiny_experiment["suites"]["arc_challenge"] = {"kind": "arc", "limit": 3, "batch_size": 4,
                                                  "dataset": {"name": "arc_challenge", "data_files": [str(data)]}}
    tiny_experiment["tasks"]["math"]["suites"] = ["gsm8k", "arc_easy", "arc_challenge"]
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora"], "n": [0],
                                "suites": ["gsm8k", "arc_easy", "arc_challenge"]}]
    exp = experiment_from_dict(tiny_experiment)
    [cell] = plan_cells(exp)
    assert cell == Cell("math", "none", "lora", 0, 0)
    assert cell_suites(exp, cell) == ["gsm8k", "arc_easy", "arc_challenge"]
    work = measure_workload(exp)
    assert work.eval_items["arc_challenge"] == 3 and work.eval_items["arc_easy"] == 4
    assert work.eval_tokens_per_item["arc_challenge"] > 0

    layout = RunLayout(exp.run_dir)
    result = run_cell(exp, layout, cell)
    assert result["suites"] == {"gsm8k": "task", "arc_easy": "forgetting", "arc_challenge": "forgetting"}
    assert result["metrics"]["arc_challenge"]["items"] == 3
    rows = [json.loads(line) for line in layout.cell_dir(cell.id).joinpath(
        "predictions", "arc_challenge.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["Mercury_0", "Mercury_1", "Mercury_2"]
    assert all(r["gold"] == 1 and len(r["logliks"]) == 4 for r in rows)  # answerKey "2" of labels 1-4
    gsm8k = result["metrics"]["gsm8k"]
    assert {"strict_match", "flexible_extract"} <= set(gsm8k)  # lm-eval's own, beside ours in the result

    # each suite's result is reproduced from its predictions file alone, by the suite's kind
    capsys.readouterr()  # the cell's own log lines
    for suite in ("gsm8k", "arc_easy", "arc_challenge"):
        kind = exp.suites[suite].kind
        assert main(["score", kind, str(layout.cell_dir(cell.id) / "predictions" / f"{suite}.jsonl"), "--json"]) == 0
        rescored = json.loads(capsys.readouterr().out)
        assert {k: rescored[k] for k in rescored if k in result["metrics"][suite]} == {
            k: v for k, v in result["metrics"][suite].items() if k in rescored}, suite
        assert set(rescored) - {"correct"} <= set(result["metrics"][suite]), suite
