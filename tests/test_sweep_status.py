"""`sweep status` from the run directory and recorded `scontrol -o show job` output.

The files in tests/fixtures/slurm/scontrol/ were recorded on the local test cluster
(tests/slurm_cluster.py) with the fake steps, paths rewritten to /runs/demo. The live
equivalents of these states are asserted in tests/test_sweep_slurm_cluster.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep import slurm
from d2lora_dist.sweep.plan import freeze_plan
from d2lora_dist.sweep.status import cell_status, format_status_table, parse_scontrol
from tests.slurm_cluster import experiment_dict

RECORDED = Path(__file__).parent / "fixtures" / "slurm" / "scontrol"


def recorded(*names: str):
    """A JobQuery answering from recorded lines, as `scontrol -o show job ID` would."""
    rows = [parse_scontrol(line) for n in names for line in (RECORDED / n).read_text().splitlines()]

    def query(job_id: str) -> list[dict[str, str]] | None:
        hits = [r for r in rows if job_id in (r.get("ArrayJobId"), r["JobId"])]
        return hits or None

    return query


def run_dir(tmp_path: Path, records: list[dict], **grid: object):
    data = experiment_dict("demo", str(tmp_path / "runs"))
    data["grid"][0].update(grid)
    exp = experiment_from_dict(data)
    layout = RunLayout(exp.run_dir)
    cells = freeze_plan(exp, layout)
    layout.slurm_dir.mkdir(parents=True)
    slurm.jobs_file(layout).write_text(json.dumps(records))
    return exp, layout, cells


def record(warmup: str | None, array: str, indices=(0, 1, 2, 3)) -> dict:
    return {"indices": list(indices), "jobs": {"warmup": warmup, "array": array, "report": None}}


def finish(layout: RunLayout, cell_id: str) -> None:
    layout.cell_dir(cell_id).mkdir(parents=True, exist_ok=True)
    layout.cell_result(cell_id).write_text("{}")


def test_failed_warmup_is_the_reason_the_array_never_ran(tmp_path):
    exp, layout, _ = run_dir(tmp_path, [record("1", "2")])
    rows = cell_status(exp, layout, recorded("warmup_failed.txt"))
    assert {r.describe() for r in rows} == {
        "cancelled: warm-up job 1 failed (exit 3), log /runs/demo/slurm/logs/warmup-1.err"}
    assert [r.job for r in rows] == ["2_0", "2_1", "2_2", "2_3"]


def test_cells_wait_for_a_running_warmup(tmp_path):
    exp, layout, _ = run_dir(tmp_path, [record("1", "2")])
    rows = cell_status(exp, layout, recorded("warmup_running.txt"))
    assert {r.describe() for r in rows} == {"pending: waiting for warm-up job 1 (RUNNING)"}


def test_done_failed_running_pending_in_one_array(tmp_path):
    exp, layout, cells = run_dir(tmp_path, [record("4", "5")])
    finish(layout, cells[0].id)
    layout.cell_checkpoints(cells[2].id).mkdir(parents=True)
    rows = cell_status(exp, layout, recorded("array_mixed.txt"))
    assert [(r.state, r.exit_code, r.log) for r in rows] == [
        ("done", None, None), ("failed", 4, "/runs/demo/slurm/logs/cell-5_1.err"),
        ("running", None, "/runs/demo/slurm/logs/cell-5_2.err"), ("pending", None, None)]
    assert rows[1].detail == "FAILED, exit 4, log /runs/demo/slurm/logs/cell-5_1.err"
    assert rows[2].detail == "running on vm, has checkpoints"
    assert rows[3].detail == "reason JobArrayTaskLimit"
    assert format_status_table(rows) == "\n".join([
        "#  cell                   state    job  exit  detail",
        "0  math-sft-d2lora-n8-s0  done     5_0  -",
        "1  math-sft-d2lora-n8-s1  failed   5_1  4     FAILED, exit 4, log /runs/demo/slurm/logs/cell-5_1.err",
        "2  math-sft-lora-n8-s0    running  5_2  -     running on vm, has checkpoints",
        "3  math-sft-lora-n8-s1    pending  5_3  -     reason JobArrayTaskLimit",
        "4 cells: 1 done, 1 failed, 1 running, 1 pending"])


def test_exit_zero_without_result_is_a_failure(tmp_path):
    exp, layout, _ = run_dir(tmp_path, [record("4", "5")])
    row = cell_status(exp, layout, recorded("array_mixed.txt"))[0]
    assert row.describe() == ("failed: exited 0 but wrote no result.json, "
                              "log /runs/demo/slurm/logs/cell-5_0.err")


def test_requeued_cell_is_pending_with_its_restarts(tmp_path):
    exp, layout, cells = run_dir(tmp_path, [record(None, "4", [0])], inits=["lora"], seeds=[0])
    layout.cell_checkpoints(cells[0].id).mkdir(parents=True)
    [row] = cell_status(exp, layout, recorded("requeued.txt"))
    assert row.describe() == ("pending: requeued, eligible again shortly (Slurm delays requeued jobs), "
                              "restarts 1, has checkpoints")


def test_latest_submission_of_a_cell_wins_and_unknown_jobs_are_said(tmp_path):
    # cells 1 and 3 were resubmitted (--only-failed) as array 5; array 2 is long forgotten
    exp, layout, cells = run_dir(tmp_path, [record("1", "2"), record(None, "5", [1, 3])])
    finish(layout, cells[0].id)
    rows = cell_status(exp, layout, recorded("array_mixed.txt"))
    assert [(r.state, r.job) for r in rows] == [("done", "2_0"), ("failed", "5_1"), ("unknown", "2_2"),
                                               ("pending", "5_3")]
    assert rows[2].detail == "Slurm no longer knows job 2_2; resubmit with --only-failed"


def test_without_submissions_cells_are_not_submitted(tmp_path):
    exp, layout, cells = run_dir(tmp_path, [])
    layout.cell_checkpoints(cells[1].id).mkdir(parents=True)

    def never(job_id: str):
        raise AssertionError("Slurm must not be asked without recorded jobs")

    rows = cell_status(exp, layout, never)
    assert [r.describe() for r in rows] == ["not submitted", "not submitted: has checkpoints",
                                            "not submitted", "not submitted"]


def test_parse_scontrol_keeps_values_with_spaces_and_equals():
    row = parse_scontrol("JobId=7 JobName=my job TRES=cpu=1,node=1 Dependency=afterok:1(failed) Power=")
    assert row == {"JobId": "7", "JobName": "my job", "TRES": "cpu=1,node=1",
                   "Dependency": "afterok:1(failed)", "Power": ""}
