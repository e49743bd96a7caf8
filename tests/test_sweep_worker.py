"""The cell worker: several cells in one process on one loaded base, each as if in a process of its own.

A cell run in the worker after other cells (another method, seed and init) trains the bit-identical
adapter and writes the same predictions as `sweep cell` in a fresh process; the base model loads
once; a failing cell is reported and the next one completes; the local executor gives each cell its
own process when the worker is off, and always for multi-rank launches.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2lora_dist import adapters
from d2lora_dist.base_cache import BaseChanged, SharedBase, weights_checksum
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.modeling import attach_lora
from d2lora_dist.strategy import cell_launch
from d2lora_dist.sweep.grid import find_cell
from d2lora_dist.sweep.pool import runs_in_worker
from d2lora_dist.sweep.worker import run_cells
from d2lora_dist.warmup import run_warmup
from tests.conftest import write_experiment
from tests.test_cli import _cli

GRID = [{"task": "math", "methods": ["sft", "dpo"], "inits": ["lora", "d2lora"], "n": [0, 4], "seeds": [0, 1]}]
# run in the worker after other cells; each compared with the same cell in a process of its own
FRESH = "math-dpo-lora-n4-s1"  # a fresh LoRA (its seed draws it) after an SFT cell of seed 0
WARM = "math-dpo-d2lora-n4-s1"  # warm-started from the warm-up adapter
WARM_N0 = "math-none-d2lora-n0-s0"  # evaluation only: the warm-up adapter on the shared base
COMPARED = (FRESH, WARM, WARM_N0)


@pytest.fixture
def warmed(tiny_experiment: dict, tmp_path: Path):
    tiny_experiment["lora"]["dropout"] = 0.1  # dropout masks are part of what must be reproduced
    tiny_experiment["grid"] = GRID
    exp = experiment_from_dict(tiny_experiment)
    run_warmup(exp, RunLayout(exp.run_dir))
    return tiny_experiment, exp


def _adapter(layout: RunLayout, cell_id: str) -> dict[str, torch.Tensor]:
    return load_file(str(layout.cell_adapter(cell_id) / adapters.WEIGHTS))


def _predictions(layout: RunLayout, cell_id: str) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((layout.cell_dir(cell_id) / "predictions").glob("*.jsonl"))}


def test_a_cell_in_the_worker_after_others_equals_the_cell_in_its_own_process(warmed, tmp_path: Path) -> None:
    data, exp = warmed
    layout = RunLayout(exp.run_dir)
    models = SharedBase()
    order = ["math-sft-lora-n4-s0", *COMPARED]
    start = time.time()
    failed = run_cells(exp, layout, [find_cell(exp, c) for c in order], "test", models)
    worker_s = (time.time() - start) / len(order)
    assert failed == [] and models.loads == 1  # one load for four cells, training and evaluation

    data = {**data, "output_dir": str(tmp_path / "own")}  # the same experiment, a run directory of its own
    own = RunLayout(experiment_from_dict(data).run_dir)
    own.root.mkdir(parents=True)
    shutil.copytree(layout.warmup_dir, own.warmup_dir)
    path = write_experiment(data, tmp_path / "own.yaml")
    start = time.time()
    for cell_id in COMPARED:
        done = _cli("sweep", "cell", "-c", str(path), "--cell", cell_id)
        assert done.returncode == 0, done.stderr[-3000:]
    own_s = (time.time() - start) / len(COMPARED)
    print(f"per cell: worker {worker_s:.1f}s, own process {own_s:.1f}s (tiny model, machine under load)")

    # bit for bit: the same code path at the same thread count (this process and `sweep cell` both use torch's
    # default), in a worker after other cells or in a process of its own; a difference is state that leaked
    for cell_id in (FRESH, WARM):
        shared, alone = _adapter(layout, cell_id), _adapter(own, cell_id)
        assert shared.keys() == alone.keys() and all(torch.equal(shared[k], alone[k]) for k in shared), cell_id
    for cell_id in COMPARED:
        assert _predictions(layout, cell_id) == _predictions(own, cell_id) != {}
        mine, theirs = (json.loads(r.cell_result(cell_id).read_text()) for r in (layout, own))
        assert mine["metrics"] == theirs["metrics"]
        assert mine["shared_worker"] is True and theirs["shared_worker"] is False
    assert adapters.read_manifest(layout.cell_adapter(FRESH))["shared_worker"] is True


def test_a_failing_cell_is_reported_and_the_next_completes_on_the_same_base(
        tiny_experiment: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_experiment["grid"] = GRID
    exp = experiment_from_dict(tiny_experiment)  # no warm-up: d2lora cells cannot run
    layout = RunLayout(exp.run_dir)
    models = SharedBase()
    monkeypatch.setenv("D2LORA_TEST_CRASH_RANK_AT_STEP", "0:1")  # raises mid-training, LoRA attached
    assert run_cells(exp, layout, [find_cell(exp, "math-sft-lora-n4-s0")], "test", models) == ["math-sft-lora-n4-s0"]
    monkeypatch.delenv("D2LORA_TEST_CRASH_RANK_AT_STEP")
    cells = [find_cell(exp, c) for c in ("math-none-d2lora-n0-s0", "math-dpo-lora-n4-s0", "math-none-lora-n0-s0")]
    assert run_cells(exp, layout, cells, "test", models) == ["math-none-d2lora-n0-s0"]
    assert not layout.cell_result("math-sft-lora-n4-s0").exists()
    assert not layout.cell_result("math-none-d2lora-n0-s0").exists()
    assert layout.cell_result("math-dpo-lora-n4-s0").is_file() and layout.cell_result("math-none-lora-n0-s0").is_file()
    assert models.loads == 1  # the crash gave the base back pristine: no reload for the next cells


def test_a_base_that_comes_back_changed_is_refused_and_dropped(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    models = SharedBase()
    with pytest.raises(BaseChanged, match="weights changed"), models.base(exp.model, training=True) as base:
        before = weights_checksum(base)
        model = attach_lora(base, exp.lora)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "q_proj.base_layer" in n).add_(1e-3)
    with models.base(exp.model, training=False) as base:
        assert models.loads == 2 and weights_checksum(base) == before  # a fresh copy, not the changed one


def test_the_base_comes_back_as_loaded_after_peft_and_a_trainer_change_it(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    models = SharedBase()
    with models.base(exp.model, training=False) as base:
        pristine = (weights_checksum(base), [n for n, _ in base.named_modules()], base.config.to_dict())
    with models.base(exp.model, training=True) as base:
        model = attach_lora(base, exp.lora)
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
        base.config.pad_token_id, base.generation_config.pad_token_id = 1, 1  # what TRL's trainers write
        model.train()
    with models.base(exp.model, training=False) as base:
        assert (weights_checksum(base), [n for n, _ in base.named_modules()], base.config.to_dict()) == pristine
        assert not base.training and not hasattr(base, "peft_config") and models.loads == 1


def test_worker_on_runs_one_process_cells_in_it_and_off_or_multi_rank_gives_each_cell_its_process(
        tiny_experiment: dict) -> None:
    tiny_experiment["grid"] = GRID
    exp = experiment_from_dict(tiny_experiment)
    cells = [find_cell(exp, c) for c in ("math-sft-lora-n4-s0", "math-dpo-lora-n4-s1", "math-none-lora-n0-s0")]
    launches = [cell_launch(exp, [c.method], packed=False) for c in cells]
    assert [runs_in_worker(launch, cell_worker=True) for launch in launches] == [True, True, True]
    assert [runs_in_worker(launch, cell_worker=False) for launch in launches] == [False, False, False]
    tiny_experiment["launch"] = {"accelerate_config": "launch/accelerate/cpu_ddp.yaml", "num_processes": 2}
    ranks = experiment_from_dict(tiny_experiment)  # multi-rank launches keep one cell per launch
    assert [runs_in_worker(cell_launch(ranks, [c.method], packed=False), True) for c in cells] == [False] * 3
