"""`d2lora sweep plan --power-from RUN_DIR`: the detectable effect of each planned comparison from a
pilot's variance components, checked against the crossed analysis of the pilot's own item scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.errors import InputError
from d2lora_dist.layout import RunLayout
from d2lora_dist.report.power import plan_power
from d2lora_dist.report.stats import crossed, mde_at, seeds_to_detect
from tests.test_report import FIXTURE, hits, sft_cells


def pilot_scores(seed: int, init: str) -> list[float]:
    """Seed-dependent accuracy, D2LoRA a few items ahead, and items shared by both seeds."""
    rng = np.random.default_rng(100 * seed + (init == "d2lora"))
    base = np.array(hits(0.5, start=seed))
    flips = rng.random(base.size) < (0.12 if init == "d2lora" else 0.08)
    return np.where(flips, 1.0 - base, base).tolist()


def fixture(tmp_path: Path, seeds: list[int]) -> dict:
    data = yaml.safe_load(FIXTURE.read_text())
    data["output_dir"] = str(tmp_path / "runs")
    for block in data["grid"]:
        block["seeds"] = seeds
    return data


@pytest.fixture
def pilot(tmp_path):
    data = fixture(tmp_path / "pilot", [0, 1, 2])
    exp = experiment_from_dict(data, "pilot.yaml")
    layout = RunLayout(exp.run_dir)
    layout.root.mkdir(parents=True)
    layout.experiment_file.write_text(yaml.safe_dump(data))
    sft_cells(layout, 100, [(pilot_scores(s, "lora"), pilot_scores(s, "d2lora")) for s in range(3)])
    return layout.root


def test_planned_seeds_get_the_mde_of_the_pilots_components(tmp_path, pilot):
    planned = experiment_from_dict(fixture(tmp_path / "big", list(range(8))), "big.yaml")
    rows = {(r.task, r.method, r.n, r.metric): r for r in plan_power(planned, pilot)}
    row = rows[("math", "sft", 100, "accuracy")]
    matrix = np.array([np.array(pilot_scores(s, "d2lora")) - np.array(pilot_scores(s, "lora")) for s in range(3)])
    comp = crossed(matrix).components()
    # the suite's limit (50) is the planned item count; the pilot answered 100
    assert (row.primary, row.seeds, row.items, row.pilot) == (True, 8, 50, "3 x 100")
    assert row.mde == pytest.approx(100 * mde_at(comp, 8, 50))
    assert row.seed_sd == pytest.approx(100 * comp.seed ** 0.5) and row.resid_sd == pytest.approx(100 * comp.resid ** 0.5)
    assert (row.target, row.seeds_for_target) == (1.0, seeds_to_detect(0.01, comp, 50))
    # comparisons the pilot did not run say so; nothing is borrowed
    assert rows[("math", "dpo", 100, "accuracy")].mde is None
    assert rows[("math", "dpo", 100, "accuracy")].pilot == "the pilot has no item-level Δ here"
    assert ("math", "none", 0, "accuracy") not in rows  # n = 0 trains nothing: no seeds to plan


def test_a_pilot_that_is_not_a_run_directory_is_an_input_error(tmp_path, pilot):
    planned = experiment_from_dict(fixture(tmp_path / "big", list(range(8))), "big.yaml")
    with pytest.raises(InputError, match=r"--power-from .*nowhere: no experiment.yaml there"):
        plan_power(planned, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "experiment.yaml").write_text((pilot / "experiment.yaml").read_text())
    with pytest.raises(InputError, match="no finished cell"):
        plan_power(planned, tmp_path / "empty")
