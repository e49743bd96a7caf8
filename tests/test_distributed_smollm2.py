"""The real SmolLM2-135M-Instruct under 2-rank ZeRO-3 (slow tier): the warm-up saves a complete
adapter, and DPO from it starts at ln 2 (the warm-up adapter really is the starting policy)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from d2lora_dist import adapters
from d2lora_dist.layout import RunLayout
from tests.conftest import write_experiment
from tests.dist_scripts.launching import CLI, launch, run

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _train(**extra) -> dict:
    return {"learning_rate": 5e-4, "epochs": 1, "max_steps": 2, "per_device_batch_size": 2,
            "global_batch_size": 4, "max_length": 64, "logging_steps": 1, "save_steps": 50, **extra}


def test_smollm2_zero3_warmup_then_dpo_from_it(tmp_path: Path) -> None:
    experiment = {
        "name": "smol", "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": "asset:smollm2", "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "warmup": {"dataset": {"name": "orpo_dpo_mix", "data_files": ["asset:dpo_demo"]}, "n": 8,
                   "train": _train()},
        "tasks": {"math": {"dataset": {"name": "math_step_dpo", "data_files": ["asset:math_synthetic"]},
                           "suites": ["arc_easy"]}},
        "suites": {"arc_easy": {"kind": "arc", "dataset": {"name": "arc_easy", "data_files": ["asset:arc_easy"]},
                                "limit": 3, "batch_size": 3}},
        "methods": {"dpo": _train(beta=0.1, reference="init", max_steps=1, max_length=256)},
        "grid": [{"task": "math", "methods": ["dpo"], "inits": ["d2lora"], "n": [4]}],
        "tracking": {"mode": "disabled"},
    }
    config = write_experiment(experiment, tmp_path / "smol.yaml")
    layout = RunLayout(tmp_path / "runs" / "smol")
    warmup = run(launch("cpu_2proc_zero3.yaml", [*CLI, "warmup", "-c", str(config)]), tmp_path / "warmup.log",
                 timeout=600)
    assert warmup.code == 0, warmup.tail()
    adapters.verify_adapter(layout.warmup_adapter)
    state = load_file(str(layout.warmup_adapter / adapters.WEIGHTS))
    assert len(state) == 30 * 2 * 2  # 30 layers x (q, v) x (A, B)
    for key, tensor in state.items():
        out_dim = 3 * 64 if "v_proj" in key else 576  # 3 kv heads x head dim 64; hidden 576
        assert list(tensor.shape) == ([8, 576] if "lora_A" in key else [out_dim, 8]), key
        if "lora_B" in key:
            assert tensor.abs().sum() > 0, key

    adapt = run(launch("cpu_2proc_zero3.yaml", [*CLI, "adapt", "-c", str(config), "--task", "math",
                                                "--method", "dpo", "--init", "d2lora", "--n", "4"]),
                tmp_path / "adapt.log", timeout=600)
    assert adapt.code == 0, adapt.tail()
    result = json.loads(layout.cell_result("math-dpo-d2lora-n4-s0").read_text())
    assert result["train"]["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert len((layout.cell_predictions("math-dpo-d2lora-n4-s0", "arc_easy")).read_text().splitlines()) == 3
