"""End to end on the real SmolLM2-135M-Instruct (offline assets): warm-up -> DPO from the
warm-up adapter -> evaluation on real GSM8K, ARC-Easy and arXiv title items, via the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.conftest import REPO, write_experiment

pytestmark = pytest.mark.slow


def _train(**extra) -> dict:
    return {"learning_rate": 5e-4, "epochs": 1, "per_device_batch_size": 2, "global_batch_size": 2,
            "max_length": 256, "logging_steps": 1, "save_steps": 50, **extra}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e")
    experiment = {
        "name": "e2e", "output_dir": str(root / "runs"),
        "model": {"name_or_path": "asset:smollm2", "dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "warmup": {"dataset": {"name": "orpo_dpo_mix", "data_files": ["asset:dpo_demo"]}, "n": 6,
                   "train": _train()},
        "tasks": {"math": {"dataset": {"name": "math_step_dpo", "data_files": ["asset:math_synthetic"]},
                           "suites": ["gsm8k", "arc_easy", "titles"]}},
        "suites": {"gsm8k": {"kind": "gsm8k", "dataset": {"name": "gsm8k", "data_files": ["asset:gsm8k"]},
                             "limit": 3, "batch_size": 3, "max_new_tokens": 96},
                   "arc_easy": {"kind": "arc", "dataset": {"name": "arc_easy", "data_files": ["asset:arc_easy"]},
                                "limit": 6, "batch_size": 6},
                   "titles": {"kind": "titles", "limit": 3, "batch_size": 3, "max_new_tokens": 32,
                              "dataset": {"name": "econ_abstracts", "data_files": ["asset:titles"]}}},
        "methods": {"dpo": _train(beta=0.1, reference="init")},
        "grid": [{"task": "math", "methods": ["dpo"], "inits": ["d2lora"], "n": [4]}],
        "tracking": {"mode": "disabled"},
    }
    path = write_experiment(experiment, root / "e2e.yaml")
    for args in (["warmup", "-c", str(path)],
                 ["adapt", "-c", str(path), "--task", "math", "--method", "dpo", "--init", "d2lora", "--n", "4"]):
        done = subprocess.run([sys.executable, "-m", "d2lora_dist.cli", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-4000:]
    return root / "runs" / "e2e"


def test_warmup_adapter_has_real_nonzero_weights_of_the_right_shape(e2e: Path) -> None:
    manifest = json.loads((e2e / "warmup/adapter/manifest.json").read_text())
    assert manifest["base_model"]["name"] == "asset:smollm2" and manifest["lora"]["r"] == 8
    with safe_open(str(e2e / "warmup/adapter/adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert len(keys) == 30 * 2 * 2  # 30 layers x (q, v) x (A, B)
        a = f.get_tensor(next(k for k in keys if "q_proj.lora_A" in k))
        b = f.get_tensor(next(k for k in keys if "q_proj.lora_B" in k))
    assert tuple(a.shape) == (8, 576) and tuple(b.shape) == (576, 8)
    assert b.abs().sum() > 0  # trained away from the B = 0 initialisation


def test_dpo_from_the_warmup_adapter_starts_at_ln2(e2e: Path) -> None:
    result = json.loads((e2e / "cells/math-dpo-d2lora-n4-s0/result.json").read_text())
    assert result["train"]["first_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert result["train"]["steps"] == 2
    warm = json.loads((e2e / "warmup/adapter/manifest.json").read_text())
    assert result["adapter"]["parent_sha256"] == warm["adapter_sha256"]


def test_evaluation_outputs_are_real_and_in_range(e2e: Path) -> None:
    result = json.loads((e2e / "cells/math-dpo-d2lora-n4-s0/result.json").read_text())
    metrics = result["metrics"]
    assert metrics["gsm8k"]["items"] == 3 and 0 <= metrics["gsm8k"]["accuracy"] <= 1
    assert metrics["arc_easy"]["items"] == 6 and 0 <= metrics["arc_easy"]["accuracy"] <= 1
    assert 0 < metrics["titles"]["rougeL"] <= 1  # a real model shares words with real titles
    predictions = e2e / "cells/math-dpo-d2lora-n4-s0/predictions"
    gsm = [json.loads(line) for line in (predictions / "gsm8k.jsonl").read_text().splitlines()]
    assert len(gsm) == 3 and all(r["completion"].strip() for r in gsm)
    assert all("####" in r["reference"] for r in gsm) and all("<|im_end|>" not in r["completion"] for r in gsm)
    arc = [json.loads(line) for line in (predictions / "arc_easy.jsonl").read_text().splitlines()]
    assert all(len(r["logliks"]) == len(r["choices"]) and max(r["logliks"]) < 0 for r in arc)
    titles = [json.loads(line) for line in (predictions / "titles.jsonl").read_text().splitlines()]
    assert all(0 < len(r["completion"]) < 400 for r in titles)
