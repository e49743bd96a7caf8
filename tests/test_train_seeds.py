"""What a seed decides: a cell's rows, data order, fresh LoRA init and dropout masks.

The same cell run twice trains a bit-identical adapter; seeds 0 and 1 train different ones for
every method and init; LoRA and D2LoRA at one seed train on the same rows (the pair).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d2lora_dist import adapters
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.cell import train_cell
from d2lora_dist.sweep.grid import Cell
from d2lora_dist.warmup import run_warmup

METHODS = ("sft", "dpo", "orpo")


@pytest.fixture
def warmed_with_dropout(tiny_experiment: dict):
    """Dropout on, so that its masks are part of what the seed must reproduce."""
    tiny_experiment["lora"]["dropout"] = 0.1
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    run_warmup(exp, layout)
    return exp, layout


def _train(exp, layout: RunLayout, cell: Cell, label: str) -> dict[str, torch.Tensor]:
    """Train `cell` in its own run directory (a copy of the warm-up), return its adapter tensors."""
    own = RunLayout(layout.root.parent / f"{layout.root.name}-{label}")
    if not own.warmup_result.exists():
        own.root.mkdir(parents=True, exist_ok=True)
        import shutil

        shutil.copytree(layout.warmup_dir, own.warmup_dir)
    train_cell(exp, own, cell, own.warmup_adapter if cell.init == "d2lora" else None)
    return load_file(str(own.cell_adapter(cell.id) / adapters.WEIGHTS))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("init", ["lora", "d2lora"])
@pytest.mark.parametrize("method", METHODS)
def test_seeds_0_and_1_train_different_adapters(warmed_with_dropout, method: str, init: str) -> None:
    exp, layout = warmed_with_dropout
    seed0 = _train(exp, layout, Cell("math", method, init, 4, 0), "a")
    seed1 = _train(exp, layout, Cell("math", method, init, 4, 1), "a")
    assert not _same(seed0, seed1)


@pytest.mark.parametrize("init", ["lora", "d2lora"])
def test_the_same_cell_run_twice_trains_a_bit_identical_adapter(warmed_with_dropout, init: str) -> None:
    exp, layout = warmed_with_dropout
    cell = Cell("math", "dpo", init, 4, 1)
    assert _same(_train(exp, layout, cell, "first"), _train(exp, layout, cell, "second"))


def test_a_seed_draws_the_rows_and_both_inits_share_them(warmed_with_dropout) -> None:
    exp, layout = warmed_with_dropout
    rows = {}
    for init in ("lora", "d2lora"):
        for seed in (0, 1):
            cell = Cell("math", "sft", init, 4, seed)
            train_cell(exp, layout, cell, layout.warmup_adapter if init == "d2lora" else None)
            rows[init, seed] = json.loads(layout.cell_subset(cell.id).read_text())["indices"]
    assert rows["lora", 0] == rows["d2lora", 0] and rows["lora", 1] == rows["d2lora", 1]
    assert rows["lora", 0] != rows["lora", 1]


def test_the_warmup_seed_is_a_setting_and_changes_the_warmup(tiny_experiment: dict, tmp_path: Path) -> None:
    checksums = {}
    for seed in (0, 0, 3):
        tiny_experiment["output_dir"] = str(tmp_path / f"runs-{len(checksums)}")
        tiny_experiment["warmup"]["seed"] = seed
        exp = experiment_from_dict(tiny_experiment)
        result = run_warmup(exp, RunLayout(exp.run_dir))
        manifest = adapters.read_manifest(RunLayout(exp.run_dir).warmup_adapter)
        assert manifest["seed"] == seed
        checksums[len(checksums)] = result["adapter"]["sha256"]
    assert checksums[0] == checksums[1] != checksums[2]
