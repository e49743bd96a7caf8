"""The multi-node launch path on one machine: two accelerate "machines" on localhost (machine
ranks 0 and 1, one rank each) rendezvous and run a real ZeRO-3 warm-up, as Slurm's per-node
`accelerate launch --machine_rank $SLURM_NODEID ...` would."""

from __future__ import annotations

from pathlib import Path

import pytest

from d2lora_dist import adapters
from d2lora_dist.layout import RunLayout
from tests.conftest import write_experiment
from tests.dist_scripts.launching import CLI, free_port, machine, run_many, two_rank_batches

pytestmark = pytest.mark.distributed


def test_two_machines_on_localhost_run_a_warmup(tiny_experiment: dict, tmp_path: Path) -> None:
    config = write_experiment(two_rank_batches(tiny_experiment), tmp_path / "exp.yaml")
    port = free_port()
    command = [*CLI, "warmup", "-c", str(config)]
    first, second = run_many([machine(0, port, command), machine(1, port, command)], tmp_path, timeout=300)
    assert first.code == 0, first.tail()
    assert second.code == 0, second.tail()
    assert "[distributed] deepspeed: 2 ranks, backend gloo" in first.log
    assert "global batch 4 = 2 per device x 1 accumulation x 2 ranks" in first.log
    assert "[warmup] sft:" not in second.log  # machine 1 holds global rank 1: it neither prints nor writes
    layout = RunLayout(Path(tiny_experiment["output_dir"]) / tiny_experiment["name"])
    manifest = adapters.verify_adapter(layout.warmup_adapter)
    assert manifest["phase"] == "warmup" and layout.warmup_result.is_file()
