"""`d2lora sweep submit` end to end on a real local Slurm cluster with the real commands:
warm-up job -> array of cells -> report job on the tiny model; one cell killed mid-training,
then `--only-failed` reruns exactly that cell, which resumes from its checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.slurm import read_records
from tests import slurm_cluster
from tests.conftest import REPO, write_experiment
from tests.slurm_cluster import LocalSlurm

local_slurm = slurm_cluster.local_slurm
cluster = slurm_cluster.cluster

pytestmark = pytest.mark.slurm
SLOW_CELL = "math-sft-lora-n36-s0"  # 18 steps at batch 2: long enough to be killed mid-training
# The tiny model trains 18 steps in under a second: each step waits, so a signal lands mid-training.
SLOW_STEPS = "export D2LORA_TEST_STEP_DELAY_S=0.5"


def _d2lora(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "d2lora_dist.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_submit_warmup_cells_report_then_only_failed_resumes(cluster: LocalSlurm, tiny_experiment: dict,
                                                             tmp_path: Path) -> None:
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [0, 4, 36]}]
    tiny_experiment["slurm"] = {"time": "00:20:00", "signal_seconds": 60, "max_parallel": 2,
                                "setup": [f"export PATH={Path(sys.executable).parent}:$PATH", SLOW_STEPS]}
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    run_dir = tmp_path / "runs" / "tiny"
    submitted = _d2lora("sweep", "submit", "-c", str(path))
    assert "--dependency=afterok:" in submitted.stdout and "--dependency=afterany:" in submitted.stdout
    assert "#SBATCH --array=0-5%2" in (run_dir / "slurm" / "cell_array.sbatch").read_text()

    plan = [c["id"] for c in json.loads((run_dir / "plan.json").read_text())["cells"]]
    slow = plan.index(SLOW_CELL)
    checkpoint = run_dir / "cells" / SLOW_CELL / "checkpoints" / "checkpoint-2"
    # complete: a checkpoint cancelled while being written has no trainer_state.json and is skipped
    cluster.wait_until("the slow cell's first complete checkpoint", (checkpoint / "trainer_state.json").is_file,
                       timeout=420)
    array_job = read_records(RunLayout(run_dir))[0]["jobs"]["array"]
    cluster.run("scancel", f"{array_job}_{slow}")
    cluster.wait_until("every job to finish", lambda: not cluster.queued_ids(), timeout=420)

    done = {c for c in plan if (run_dir / "cells" / c / "result.json").is_file()}
    assert done == set(plan) - {SLOW_CELL}
    assert (run_dir / "warmup" / "adapter" / "manifest.json").is_file()
    assert (run_dir / "report" / "results.md").is_file()  # the report ran after the array (afterany)
    status = _d2lora("sweep", "status", "-c", str(path)).stdout
    assert SLOW_CELL in status and any(w in status for w in ("cancelled", "failed"))

    again = _d2lora("sweep", "submit", "-c", str(path), "--only-failed")
    assert f"#SBATCH --array={slow}%2" in (run_dir / "slurm" / "cell_array.sbatch").read_text()
    assert "# warmup not submitted: done" in again.stdout
    cluster.wait_until("the resubmitted cell", lambda: not cluster.queued_ids(), timeout=420)
    result = json.loads((run_dir / "cells" / SLOW_CELL / "result.json").read_text())
    assert result["train"]["steps"] == 18
    logs = "".join(p.read_text() for p in (run_dir / "slurm" / "logs").glob("cell-*"))
    assert f"[{SLOW_CELL}] resuming from" in logs


def test_usr1_on_a_real_cell_checkpoints_requeues_and_resumes(cluster: LocalSlurm, tiny_experiment: dict,
                                                              tmp_path: Path) -> None:
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora"], "n": [36]}]
    tiny_experiment["slurm"] = {"time": "00:20:00", "signal_seconds": 60,
                                "setup": [f"export PATH={Path(sys.executable).parent}:$PATH", SLOW_STEPS]}
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    run_dir = tmp_path / "runs" / "tiny"
    _d2lora("sweep", "submit", "-c", str(path))
    task = f"{read_records(RunLayout(run_dir))[0]['jobs']['array']}_0"
    checkpoints = run_dir / "cells" / SLOW_CELL / "checkpoints"
    cluster.wait_until("the cell's first checkpoint", (checkpoints / "checkpoint-2").is_dir, timeout=300)
    cluster.run("scancel", "--batch", "--signal=USR1", task)
    cluster.wait_until("every job to finish", lambda: not cluster.queued_ids(), timeout=420)
    job = cluster.jobs(task)[0]
    assert (job["JobState"], job["Restarts"]) == ("COMPLETED", "1")
    result = json.loads((run_dir / "cells" / SLOW_CELL / "result.json").read_text())
    assert result["train"]["steps"] == 18
    logs = "".join(p.read_text() for p in (run_dir / "slurm" / "logs").glob("cell-*"))
    assert "stopped at step" in logs and "scontrol requeue" in logs
    assert f"[{SLOW_CELL}] resuming from" in logs


def test_a_failed_warmup_holds_back_only_its_own_cells(cluster: LocalSlurm, tiny_experiment: dict,
                                                       tmp_path: Path) -> None:
    """Two named warm-ups, each its own job; `bad` diverges (lr = inf stops it at step 1). Its array is
    cancelled; the vanilla cells and the cells of `good` finish; status blames the failed warm-up."""
    from d2lora_dist.config import load_experiment
    from d2lora_dist.sweep.status import cell_status

    good = tiny_experiment.pop("warmup")
    bad = {**good, "train": {**good["train"], "learning_rate": float("inf")}}
    tiny_experiment["warmups"] = {"good": good, "bad": bad}
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [4],
                                "seeds": [0, 1]}]
    tiny_experiment["slurm"] = {"time": "00:20:00", "signal_seconds": 60, "max_parallel": 4,
                                "setup": [f"export PATH={Path(sys.executable).parent}:$PATH"]}
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    run_dir = tmp_path / "runs" / "tiny"
    submitted = _d2lora("sweep", "submit", "-c", str(path))
    record = read_records(RunLayout(run_dir))[0]
    jobs = record["jobs"]
    assert set(jobs) == {"warmup:bad", "warmup:good", "array:vanilla", "array:bad", "array:good", "report"}
    assert f"--dependency=afterok:{jobs['warmup:good']} " in submitted.stdout
    cluster.wait_until("every job to finish", lambda: not cluster.queued_ids(), timeout=600)

    plan = [c["id"] for c in json.loads((run_dir / "plan.json").read_text())["cells"]]
    done = {c for c in plan if (run_dir / "cells" / c / "result.json").is_file()}
    held = {c for c in plan if "@bad" in c}
    assert held == {"math-sft-d2lora@bad-n4-s0", "math-sft-d2lora@bad-n4-s1"}
    assert done == set(plan) - held  # vanilla and good's cells ran; nothing of bad's did
    assert (run_dir / "warmups" / "good" / "result.json").is_file()
    assert not (run_dir / "warmups" / "bad" / "result.json").exists()
    assert not any((run_dir / "cells" / c).exists() for c in held)
    assert cluster.states(jobs["warmup:bad"]) == ["FAILED"]
    assert set(cluster.states(jobs["array:bad"])) == {"CANCELLED"}
    assert (run_dir / "report" / "results.md").is_file()  # the report waits for every array (afterany)
    rows = {r.cell_id: r for r in cell_status(load_experiment(run_dir / "experiment.yaml"), RunLayout(run_dir))}
    assert all(rows[c].state == "cancelled" and f"warm-up job {jobs['warmup:bad']} failed" in rows[c].detail
               for c in held)
    assert all(rows[c].state == "done" for c in done)


def test_a_tuned_block_with_controls_and_per_seed_warmups_runs_through_slurm(cluster: LocalSlurm, tiny_experiment: dict,
                                                                            tmp_path: Path) -> None:
    """The fair-comparison grid on the real cluster: a warm-up (and its placebo) per seed, each arm's learning
    rate chosen by selection cells on the validation split, the final cells after them, the controls beside
    LoRA and D2LoRA, then the report with the tuned settings, the budgets and D2LoRA against each control."""
    tiny_experiment["warmup"] |= {"n": 4, "seeds": "per_cell"}
    tiny_experiment["tasks"]["titles"] |= {"validation": 4, "suites": ["titles"]}
    tiny_experiment["suites"]["titles_val"] = {"kind": "titles", "split": "validation", "limit": 2, "batch_size": 4,
                                               "max_new_tokens": 2}
    tiny_experiment["suites"]["titles"] |= {"limit": 2, "max_new_tokens": 2}
    tiny_experiment["grid"] = [{"task": "titles", "methods": ["sft"], "n": [2], "seeds": [0, 1],
                                "inits": ["lora", "d2lora", "lora_matched", "d2lora_placebo", "random_b"],
                                "tune": {"suite": "titles_val", "learning_rate": [1e-4, 1e-3], "seeds": [0]}}]
    tiny_experiment["slurm"] = {"time": "00:20:00", "signal_seconds": 60, "max_parallel": 4,
                                "setup": [f"export PATH={Path(sys.executable).parent}:$PATH"]}
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    run_dir = tmp_path / "runs" / "tiny"
    submitted = _d2lora("sweep", "submit", "-c", str(path))
    jobs = read_records(RunLayout(run_dir))[0]["jobs"]
    assert any(k.startswith("warmup:") and "placebo" in k for k in jobs), jobs
    assert "--dependency=afterok:" in submitted.stdout
    cluster.wait_until("every job to finish", lambda: not cluster.queued_ids(), timeout=900)

    plan = json.loads((run_dir / "plan.json").read_text())["cells"]
    ids = [c["id"] for c in plan]
    missing = [c for c in ids if not (run_dir / "cells" / c / "result.json").is_file()]
    logs = "".join(p.read_text()[-2000:] for p in (run_dir / "slurm" / "logs").glob("*.err"))
    assert not missing, (missing, logs[-4000:])
    selection = [c for c in plan if c.get("setting")]
    assert len(selection) == 5 * 2  # five arms x two learning rates x one tune seed
    for init in ("lora", "d2lora", "lora_matched", "d2lora_placebo", "random_b"):
        final = json.loads((run_dir / "cells" / f"titles-sft-{init}-n2-s1" / "result.json").read_text())
        assert final["tuning"]["role"] == "final" and final["budget"]["total"]["steps"] > 0, init
    for seed in (0, 1):  # each seed's D2LoRA cell starts from its own warm-up
        cell = json.loads((run_dir / "cells" / f"titles-sft-d2lora-n2-s{seed}" / "adapter" / "manifest.json")
                          .read_text())
        warm = json.loads((run_dir / "warmups" / f"warmup-s{seed}" / "adapter" / "manifest.json").read_text())
        assert cell["parent"]["adapter_sha256"] == warm["adapter_sha256"]
    report = (run_dir / "report" / "results.md").read_text()
    assert "Tuned settings" in report and "D2LoRA against each control" in report and "budget" in report
