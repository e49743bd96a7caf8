"""Failure behaviour of multi-rank launches: stop early with a message naming the setting,
never hang when a rank dies, and resume a killed run from its last checkpoint."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import pytest

from d2lora_dist.distributed import CRASH_ENV
from d2lora_dist.layout import RunLayout
from tests.conftest import write_experiment
from tests.dist_scripts.launching import (
    CLI,
    DS_CONFIGS,
    PG_TIMEOUT_S,
    free_port,
    launch,
    machine,
    run,
    run_many,
    two_rank_batches,
)

pytestmark = pytest.mark.distributed
def test_port_in_use_on_the_main_machine_names_the_setting(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(machine(0, port, [*CLI, "warmup", "-c", "never-read.yaml"]), tmp_path / "port.log", timeout=120)
    assert result.code != 0
    assert f"port `{port}`" in result.log and "--main_process_port" in result.log, result.tail()
    assert "[distributed]" not in result.log  # stopped by the launcher, before any rank started


def test_batch_settings_the_world_size_cannot_divide_stop_before_the_model_loads(tiny_experiment: dict,
                                                                                    tmp_path: Path) -> None:
    ds = json.loads((DS_CONFIGS / "zero3_cpu_test.json").read_text())
    ds["train_batch_size"] = 3  # 2 ranks x micro-batch 2 can never make 3
    ds_file = tmp_path / "fixed_batch.json"
    ds_file.write_text(json.dumps(ds))
    config = write_experiment(two_rank_batches(tiny_experiment), tmp_path / "exp.yaml")
    result = run(launch("cpu_2proc_zero3.yaml", [*CLI, "warmup", "-c", str(config)],
                        extra=["--deepspeed_config_file", str(ds_file)]), tmp_path / "batch.log", timeout=180)
    assert result.code != 0 and "d2lora: error:" in result.log
    assert "train_batch_size=3 in the DeepSpeed config but warmup.train.global_batch_size = 4" in result.log
    assert "world size 2 x micro-batch 2 does not divide 3" in result.log, result.tail()
    assert "attention implementation" not in result.log  # logged when the model loads: it never did


def _warmup(tiny_experiment: dict, tmp_path: Path) -> tuple[list[str], RunLayout]:
    config = write_experiment(two_rank_batches(tiny_experiment), tmp_path / "exp.yaml")
    layout = RunLayout(Path(tiny_experiment["output_dir"]) / tiny_experiment["name"])
    return [*CLI, "warmup", "-c", str(config), "--set", "warmup.train.max_steps=5"], layout


def test_a_crashed_rank_stops_the_other_machine(tiny_experiment: dict, tmp_path: Path) -> None:
    # Two launchers (separate "machines"): no common parent kills machine 0's rank when
    # machine 1's rank dies at step 3; the process group must.
    command, layout = _warmup(tiny_experiment, tmp_path)
    port = free_port()
    crashed = run_many([machine(0, port, command), machine(1, port, command)], tmp_path, timeout=300,
                       **{CRASH_ENV: "1:3"})
    assert [r.code != 0 for r in crashed] == [True, True], crashed[0].tail() + crashed[1].tail()
    assert "rank 1 crashes at step 3 (test hook)" in crashed[1].log
    assert crashed[0].seconds - crashed[1].seconds < PG_TIMEOUT_S  # machine 0 did not wait for a timeout
    assert (layout.warmup_dir / "checkpoints" / "checkpoint-2").is_dir() and not layout.warmup_adapter.exists()


def test_a_stuck_rank_times_out_and_the_restart_resumes(tiny_experiment: dict, tmp_path: Path) -> None:
    command, layout = _warmup(tiny_experiment, tmp_path)
    checkpoints = layout.warmup_dir / "checkpoints"
    timeout_s = 20
    stuck = run(launch("cpu_2proc_zero3.yaml", command), tmp_path / "stuck.log", timeout=240,
                **{CRASH_ENV: "1:3:hang", "D2LORA_PG_TIMEOUT_S": str(timeout_s)})
    assert stuck.code not in (0, -9), stuck.tail()  # ended by the process-group timeout, not by the test
    assert "rank 1 hangs at step 3 (test hook)" in stuck.log
    assert f"Timed out waiting {timeout_s * 1000}ms" in stuck.log  # rank 0 gave up: D2LORA_PG_TIMEOUT_S
    assert (checkpoints / "checkpoint-2").is_dir() and not layout.warmup_adapter.exists()

    # The same command again: resumes at step 2 and ends at the configured 5 steps.
    resumed = run(launch("cpu_2proc_zero3.yaml", command), tmp_path / "resume.log", timeout=300,
                  TRANSFORMERS_VERBOSITY="info")
    assert resumed.code == 0, resumed.tail()
    assert f"[warmup] resuming from {checkpoints / 'checkpoint-2'}" in resumed.log
    assert re.search(r"Resuming training from checkpoint with epoch \d+ and global step 2", resumed.log)
    assert len(re.findall(r"\{'loss': ", resumed.log)) == 3  # steps 3, 4, 5 only
    result = json.loads(layout.warmup_result.read_text())
    assert result["train"]["steps"] == 5 and result["adapter"]["sha256"]
    state = json.loads((checkpoints / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["global_step"] == 5 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4, 5]
