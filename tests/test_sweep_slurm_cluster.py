"""The Slurm executor on a real local cluster: scripts rendered by d2lora_dist.sweep.slurm,
submitted with `submit`, with tests/fixtures/slurm/fake_step.py standing in for the d2lora
commands (same run-directory and preemption contracts, a second per cell)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest

from d2lora_dist.config import Experiment, experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep import slurm as sweep_slurm
from d2lora_dist.sweep.preemption import PREEMPTED_EXIT_CODE
from d2lora_dist.sweep.status import cell_status, format_status_table
from tests import slurm_cluster
from tests.slurm_cluster import LocalSlurm, experiment_dict

local_slurm = slurm_cluster.local_slurm
cluster = slurm_cluster.cluster

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fixtures" / "slurm" / "fake_step.py"
PY = sys.executable


def make_run(tmp_path: Path, name: str = "demo", grid: dict | None = None, launch: dict | None = None,
             **slurm_cfg: object) -> tuple[Experiment, RunLayout]:
    data = experiment_dict(name, str(tmp_path / "runs"), time="00:10:00", signal_seconds=60,
                           setup=[f"export PYTHONPATH={REPO}", f"export PATH={Path(PY).parent}:$PATH"],
                           **slurm_cfg)
    data["grid"][0].update(grid or {})
    if launch:
        data["launch"] = launch
    exp = experiment_from_dict(data)
    return exp, RunLayout(exp.run_dir)


def fake_commands(layout: RunLayout, warmup: str = "", cell: str = "") -> dict[str, str]:
    run = layout.root
    return {"warmup": f"{PY} {FAKE} warmup {run} {warmup}".strip(),
            "cell": f"{PY} {FAKE} cell {run} $SLURM_ARRAY_TASK_ID {cell}".strip(),
            "report": f"{PY} {FAKE} report {run}"}


def trace(layout: RunLayout) -> list[tuple[float, str]]:
    path = layout.root / "trace.txt"
    rows = path.read_text().splitlines() if path.exists() else []
    return [(float(t), rest) for t, rest in (r.split(" ", 1) for r in rows)]


def event_time(events: list[tuple[float, str]], pattern: str) -> list[float]:
    return [t for t, e in events if re.match(pattern, e)]


def max_overlap(events: list[tuple[float, str]]) -> int:
    """Most cells running at once, from their start/end events."""
    marks = sorted([(t, 1) for t in event_time(events, r"cell \d+ start")]
                   + [(t, -1) for t in event_time(events, r"cell \d+ end")])
    running = peak = 0
    for _, d in marks:
        running += d
        peak = max(peak, running)
    return peak


def wait_for_event(cluster: LocalSlurm, layout: RunLayout, pattern: str, count: int = 1,
                   timeout: float = 60) -> None:
    cluster.wait_until(f"{count} x {pattern!r} in trace.txt",
                       lambda: len(event_time(trace(layout), pattern)) >= count, timeout)


def test_warmup_then_throttled_array_then_report(cluster: LocalSlurm, tmp_path):
    exp, layout = make_run(tmp_path, max_parallel=2)
    t0 = time.monotonic()
    result = sweep_slurm.submit(exp, layout, commands=fake_commands(layout, cell="--sleep 1.5"))
    w, a, r = (result.jobs[k] for k in ("warmup", "array", "report"))
    assert result.commands[1][2] == f"--dependency=afterok:{w}"
    assert result.commands[2][2] == f"--dependency=afterany:{a}"

    early = cell_status(exp, layout)  # while the warm-up runs, every cell waits for it
    assert {row.state for row in early} == {"pending"}
    assert all(row.detail.startswith(f"waiting for warm-up job {w}") for row in early), early
    wait_for_event(cluster, layout, r"cell \d+ start")
    mid = cell_status(exp, layout)
    assert "running" in {row.state for row in mid}, format_status_table(mid)

    cluster.wait_finished(w, a, r)
    elapsed = time.monotonic() - t0
    events = trace(layout)
    assert max(event_time(events, "warmup end")) < min(event_time(events, r"cell \d+ start"))
    assert max(event_time(events, r"cell \d+ end")) < min(event_time(events, "report"))
    assert len(event_time(events, r"cell \d+ end")) == 4 and max_overlap(events) <= 2
    rows = cell_status(exp, layout)
    assert [row.state for row in rows] == ["done"] * 4
    assert [row.job for row in rows] == [f"{a}_{i}" for i in range(4)]
    table = format_status_table(rows)
    assert table.splitlines()[-1] == "4 cells: 4 done"
    records = json.loads(sweep_slurm.jobs_file(layout).read_text())
    assert records[0]["jobs"] == {"warmup": w, "array": a, "report": r} and records[0]["array"] == "0-3"
    print(f"\nwarm-up -> 4 cells (%2) -> report: {elapsed:.1f} s end to end")


def test_failed_warmup_cancels_the_array_and_status_says_why(cluster: LocalSlurm, tmp_path):
    exp, layout = make_run(tmp_path)
    result = sweep_slurm.submit(exp, layout, commands=fake_commands(layout, warmup="--fail 3"))
    w, a, r = (result.jobs[k] for k in ("warmup", "array", "report"))
    cluster.wait_finished(w, a, r)
    assert cluster.states(w) == ["FAILED"]
    assert set(cluster.states(a)) == {"CANCELLED"}  # kill_invalid_depend: never ran
    assert cluster.states(r) == ["COMPLETED"]  # afterany: the report still runs
    log = sweep_slurm.log_path(layout, "warmup", w)
    assert "failing on purpose" in log.read_text()
    rows = cell_status(exp, layout)
    assert [row.describe() for row in rows] == [f"cancelled: warm-up job {w} failed (exit 3), log {log}"] * 4
    assert "4 cells: 4 cancelled" in format_status_table(rows)


def test_failed_cells_show_exit_codes_and_only_failed_resubmits_them(cluster: LocalSlurm, tmp_path):
    exp, layout = make_run(tmp_path, max_parallel=4)
    failing = tmp_path / "failing.json"
    failing.write_text(json.dumps({"1": 4, "3": 5}))
    commands = fake_commands(layout, cell=f"--sleep 0.2 --fail-if-exists {failing}")
    first = sweep_slurm.submit(exp, layout, commands=commands)
    cluster.wait_finished(*first.jobs.values())
    a = first.jobs["array"]
    rows = cell_status(exp, layout)
    assert [(row.state, row.exit_code) for row in rows] == [("done", None), ("failed", 4), ("done", None),
                                                            ("failed", 5)]
    for row in (rows[1], rows[3]):
        assert row.log == str(sweep_slurm.log_path(layout, "array", a, row.index))
        assert "failing on purpose" in Path(row.log).read_text()
        assert row.detail == f"FAILED, exit {row.exit_code}, log {row.log}"
    table = format_status_table(rows)
    assert "4 cells: 2 done, 2 failed" in table and f"{a}_1" in table

    failing.unlink()  # "fix the bug", resubmit what has no result.json
    second = sweep_slurm.submit(exp, layout, only_failed=True, commands=commands)
    assert second.indices == [1, 3] and "warmup" in second.skipped  # warm-up result exists
    assert "#SBATCH --array=1,3%4" in (layout.slurm_dir / "cell_array.sbatch").read_text()
    assert second.commands[0][2:] == [str(layout.slurm_dir / "cell_array.sbatch")]  # no dependency
    cluster.wait_finished(*second.jobs.values())
    rows = cell_status(exp, layout)
    assert [row.state for row in rows] == ["done"] * 4
    assert [row.job for row in rows] == [f"{a}_0", f"{second.jobs['array']}_1", f"{a}_2",
                                         f"{second.jobs['array']}_3"]
    records = json.loads(sweep_slurm.jobs_file(layout).read_text())
    assert [rec["indices"] for rec in records] == [[0, 1, 2, 3], [1, 3]]
    assert records[0]["jobs"] == first.jobs


def test_usr1_checkpoints_requeues_and_the_requeued_run_resumes(cluster: LocalSlurm, tmp_path):
    exp, layout = make_run(tmp_path, grid={"inits": ["lora"], "seeds": [0]})  # one cell, no warm-up
    result = sweep_slurm.submit(exp, layout, commands=fake_commands(layout, cell="--sleep 60"))
    a = result.jobs["array"]
    task = f"{a}_0"
    wait_for_event(cluster, layout, r"cell 0 start")  # the step's handler is installed
    t0 = time.monotonic()
    cluster.run("scancel", "--batch", "--signal=USR1", task)
    cluster.wait_until("the requeue", lambda: any(
        j.get("Restarts") == "1" and j.get("JobState") == "PENDING" for j in cluster.jobs(task)), timeout=30)
    requeue_s = time.monotonic() - t0
    log = Path(sweep_slurm.log_path(layout, "array", a, 0, ext="out")).read_text()
    assert f"step preempted (exit {PREEMPTED_EXIT_CODE}): scontrol requeue {task}" in log
    row = cell_status(exp, layout)[0]
    assert row.state == "pending" and "restarts 1" in row.detail and "has checkpoints" in row.detail
    # eligible again cred_expire + 1 s after the requeue (fixture: 10 s, Slurm's default: 120 s)
    cluster.wait_finished(a, timeout=60)
    job = cluster.jobs(task)[0]
    assert (job["JobState"], job["ExitCode"], job["Restarts"]) == ("COMPLETED", "0:0", "1")
    events = [e for _, e in trace(layout)]
    assert [e.split(" rank")[0] for e in events] == ["cell 0 start", "cell 0 checkpointed", "cell 0 start",
                                                     "cell 0 resumed", "cell 0 end"]
    assert cell_status(exp, layout)[0].state == "done"
    print(f"\nUSR1 -> checkpoint -> requeued (PENDING, Restarts=1) in {requeue_s:.1f} s, "
          f"finished {time.monotonic() - t0:.1f} s after the signal")


@pytest.mark.distributed
def test_multi_rank_warmup_under_accelerate_is_preempted_and_resumes(cluster: LocalSlurm, tmp_path):
    """Two gloo ranks under `accelerate launch` in the warm-up template (srun per node):
    USR1 reaches the ranks but not the launcher, they agree, checkpoint and exit; the
    launcher's exit 1 is recognised through the marker and the job is requeued."""
    accel = REPO / "tests" / "fixtures" / "slurm" / "accelerate_cpu2.yaml"
    exp, layout = make_run(tmp_path, grid={"seeds": [0], "inits": ["d2lora"]},
                           launch={"accelerate_config": str(accel), "num_processes": 2})
    result = sweep_slurm.submit(exp, layout, commands=fake_commands(layout, warmup="--sleep 120 --dist"))
    w = result.jobs["warmup"]
    wait_for_event(cluster, layout, "warmup start", count=2, timeout=120)
    cluster.run("scancel", "--batch", "--signal=USR1", w)
    cluster.wait_until("the requeue", lambda: any(
        j.get("Restarts") == "1" and j.get("JobState") == "PENDING" for j in cluster.jobs(w)), timeout=60)
    log = Path(sweep_slurm.log_path(layout, "warmup", w, ext="out")).read_text()
    assert f"step preempted (exit 1): scontrol requeue {w}" in log  # accelerate's 1, seen via the marker
    cluster.wait_finished(*result.jobs.values(), timeout=180)
    events = [e for _, e in trace(layout)]
    for what, runs in (("warmup start", 2), ("warmup checkpointed", 1), ("warmup resumed", 1)):
        ranks = sorted(e.split(" ")[-3] for e in events if e.startswith(what))
        assert ranks == ["rank=0"] * runs + ["rank=1"] * runs, (what, events)
    assert all("node_id=0" in e for e in events if e.startswith("warmup"))  # expanded in the task
    assert [row.state for row in cell_status(exp, layout)] == ["done"]


def test_a_partition_slurm_does_not_have_is_refused_naming_the_job_and_nothing_is_recorded(cluster: LocalSlurm,
                                                                                           tmp_path):
    exp, layout = make_run(tmp_path, partition="no-such-partition")
    with pytest.raises(sweep_slurm.SbatchFailed) as caught:
        sweep_slurm.submit(exp, layout, commands=fake_commands(layout))
    message = str(caught.value)
    assert message.startswith(f"sweep submit: the warm-up job was not submitted: `sbatch --parsable "
                              f"{layout.slurm_dir}/warmup.sbatch` exited 1: sbatch: error:")
    assert "invalid partition" in message.lower() and message.endswith("nothing was submitted")
    assert not sweep_slurm.jobs_file(layout).exists()  # no job, no record
    assert cluster.run("squeue", "-h").stdout.strip() == ""
