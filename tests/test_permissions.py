"""Every file and folder a run writes has the modes a plain open()/mkdir() gives under the process umask:
on a shared project directory, colleagues read the adapters as they read the results."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_experiment
from tests.test_cli import REPO


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_adapters_results_predictions_and_reports_follow_the_umask(tiny_experiment: dict, tmp_path: Path,
                                                                           umask: int) -> None:
    tiny_experiment["grid"] = [{"task": "math", "methods": ["sft"], "inits": ["lora"], "n": [4]}]
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "d2lora_dist.cli", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=600, preexec_fn=lambda: os.umask(umask))

    adapted = cli("adapt", "-c", str(path), "--task", "math", "--method", "sft", "--init", "lora", "--n", "4")
    assert adapted.returncode == 0, adapted.stderr[-3000:]
    reported = cli("report", "-c", str(path))
    assert reported.returncode == 0, reported.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    cell = run_dir / "cells" / "math-sft-lora-n4-s0"
    # W&B's offline runs (when WANDB_MODE=offline is set) are written by wandb with modes of its own choosing
    written = [p for p in run_dir.rglob("*") if not p.is_symlink() and "wandb" not in p.relative_to(run_dir).parts]
    for must in (cell / "adapter" / "adapter_model.safetensors", cell / "adapter" / "manifest.json",
                 cell / "result.json", cell / "predictions" / "gsm8k.jsonl", run_dir / "report" / "results.md"):
        assert must in written, must
    wrong = {str(p.relative_to(run_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in written
             if stat.S_IMODE(p.stat().st_mode) != ((0o777 if p.is_dir() else 0o666) & ~umask)}
    assert not wrong, f"not as umask {umask:03o} says: {wrong}"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_cached_pissa_factors_follow_the_umask(tiny_experiment: dict, umask: int) -> None:
    from d2lora_dist.config import experiment_from_dict
    from d2lora_dist.modeling import base_fingerprint
    from d2lora_dist.residual import ensure_factors, factors_key

    exp = experiment_from_dict(tiny_experiment)
    previous = os.umask(umask)
    try:
        out = Path(ensure_factors(exp, factors_key(base_fingerprint(exp.model), exp.model.dtype, exp.lora, "pissa",
                                                   0))["path"])
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    files = sorted(out.iterdir())
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o666 & ~umask for p in files}
