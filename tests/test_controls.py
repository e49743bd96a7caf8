"""The control arms (lora_matched, d2lora_placebo, random_b) and per-seed warm-ups, on the tiny model:
what each control changes about its phase is checked on what really trained, not on what was recorded."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from d2lora_dist import adapters, controls, warmup
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.data.selection import warmup_records
from d2lora_dist.errors import InputError
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.cell import run_cell
from d2lora_dist.sweep.grid import NO_TRAINING, Cell, WarmupRun, plan_cells, warmup_runs
from d2lora_dist.warmup import planned_warmups, run_warmup
from tests.conftest import tiny_experiment_dict

CONTROL_GRID = [{"task": "titles", "methods": ["sft"], "n": [0, 4], "seeds": [0],
                 "inits": ["lora", "d2lora", "lora_matched", "d2lora_placebo", "random_b"]}]


class StartState(TrainerCallback):
    """The adapter as training starts (after any warm start or random B): what the phase really began from."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.state = {k: v.clone() for k, v in adapters.gathered_state_dict(model).items()}


def _experiment(base: dict, root: Path, grid: list[dict], **warmup_extra):
    data = copy.deepcopy(base)
    data["output_dir"] = str(root / "runs")
    data["grid"] = grid
    data["tasks"]["titles"]["suites"] = ["titles"]  # evaluation is not under test here: keep it short
    data["suites"]["titles"].update(limit=1, max_new_tokens=2)
    data["warmup"].update(warmup_extra)
    return experiment_from_dict(data)


@pytest.fixture(scope="module")
def controls_run(tiny_model_dir, tiny_data, tmp_path_factory):
    """One experiment with every control; its warm-ups (real and placebo) trained once for the module."""
    root = tmp_path_factory.mktemp("controls")
    exp = _experiment(tiny_experiment_dict(tiny_model_dir, tiny_data, root), root, CONTROL_GRID, n=4)
    layout = RunLayout(exp.run_dir)
    trained: dict[str, list[dict]] = {}
    real_train = warmup.train_phase

    def spy(exp_, phase):  # the real training; it keeps which rows each warm-up trained on
        trained[phase.name] = list(phase.records)
        return real_train(exp_, phase)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(warmup, "train_phase", spy)
        for run in planned_warmups(exp):
            run_warmup(exp, layout, run=run)
    vanilla = StartState()  # the vanilla cell every control is compared with, and where it started
    lora = run_cell(exp, layout, Cell("titles", "sft", "lora", 4, 0), callbacks=[vanilla])
    return exp, layout, trained, lora, vanilla.state


# ---- plan ---------------------------------------------------------------------------------------

def test_controls_are_cells_with_their_warmup_and_n0_where_it_means_something(tiny_experiment, tmp_path):
    exp = _experiment(tiny_experiment, tmp_path, CONTROL_GRID)
    cells = {c.id: c for c in plan_cells(exp)}
    assert set(cells) == {"titles-none-lora-n0-s0", "titles-none-d2lora-n0-s0", "titles-none-d2lora_placebo-n0-s0",
                          *(f"titles-sft-{i}-n4-s0" for i in CONTROL_GRID[0]["inits"])}
    # lora_matched at n = 0 is the base model (the lora cell); random_b has no untrained cell
    assert cells["titles-sft-lora_matched-n4-s0"].warmup_run is None  # takes only the warm-up's step count
    assert cells["titles-sft-random_b-n4-s0"].warmup_run == WarmupRun("warmup")  # reads the real warm-up's B
    assert cells["titles-sft-d2lora_placebo-n4-s0"].warmup_run == WarmupRun("warmup", placebo=True)
    assert [r.key for r in warmup_runs(list(cells.values()))] == ["warmup", "warmup+placebo"]
    assert RunLayout(tmp_path).warmup_home("warmup+placebo") == tmp_path / "warmups" / "warmup+placebo"


def test_warmup_run_keys_round_trip():
    for run in [WarmupRun("warmup"), WarmupRun("m64", "pissa_niter_4", placebo=True, seed=3),
                WarmupRun("m_192", placebo=True), WarmupRun("m64", seed=0), WarmupRun("m64", "olora")]:
        assert WarmupRun.parse(run.key) == run
    assert WarmupRun("m64", "pissa", True, 2).key == "m64+pissa+placebo-s2"


def test_per_cell_warmups_give_each_seed_its_own_run_and_keep_the_default_single(tiny_experiment, tmp_path):
    grid = [{"task": "titles", "methods": ["sft"], "n": [0, 4], "seeds": [0, 1], "inits": ["lora", "d2lora"]}]
    single = plan_cells(_experiment(tiny_experiment, tmp_path, grid))
    assert [r.key for r in warmup_runs(single)] == ["warmup"]
    assert {c.id for c in single if c.n == 0} == {"titles-none-lora-n0-s0", "titles-none-d2lora-n0-s0"}
    per_cell = plan_cells(_experiment(tiny_experiment, tmp_path, grid, seeds="per_cell"))
    assert [r.key for r in warmup_runs(per_cell)] == ["warmup-s0", "warmup-s1"]
    runs = {c.id: c.warmup_run for c in per_cell if c.init == "d2lora"}
    assert runs == {"titles-none-d2lora-n0-s0": WarmupRun("warmup", seed=0),
                    "titles-none-d2lora-n0-s1": WarmupRun("warmup", seed=1),  # n = 0 evaluates each draw
                    "titles-sft-d2lora-n4-s0": WarmupRun("warmup", seed=0),
                    "titles-sft-d2lora-n4-s1": WarmupRun("warmup", seed=1)}
    assert all(Cell.from_dict(c.to_dict()).warmup_run == c.warmup_run for c in per_cell)  # as plan.json holds it
    assert "warmup_per_seed" not in single[0].to_dict()  # plans without it read as before


def test_placebo_moves_every_response_to_another_prompt():
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"content": f"a{i}"}]}
            for i in range(7)]
    shuffled, source = controls.placebo_records(rows, seed=5)
    assert [r["prompt"] for r in shuffled] == [r["prompt"] for r in rows]
    assert sorted(source) == list(range(7)) and all(source[i] != i for i in range(7))
    assert [r["completion"] for r in shuffled] == [rows[j]["completion"] for j in source]
    assert controls.placebo_records(rows, seed=5)[1] == source != controls.placebo_records(rows, seed=6)[1]
    with pytest.raises(InputError, match="at least 2 rows"):
        controls.placebo_records(rows[:1], seed=0)


def test_random_b_state_refuses_an_adapter_of_other_modules():
    state = {"q.lora_A.weight": torch.ones(2, 4), "q.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(InputError, match="B modules"):
        controls.random_b_state(state, {"k.lora_B.weight": 1.0}, seed=0)


# ---- what trained ---------------------------------------------------------------------------------

def test_placebo_warmup_trains_the_real_warmups_responses_permuted(controls_run):
    exp, layout, trained, _, _ = controls_run
    real, placebo = trained["warmup"], trained["warmup-warmup+placebo"]
    assert real == warmup_records(exp, "warmup")[0]
    assert [r["prompt"] for r in placebo] == [r["prompt"] for r in real]
    assert sorted(map(repr, (r["completion"] for r in placebo))) == sorted(map(repr, (r["completion"] for r in real)))
    assert all(p["completion"] != r["completion"] for p, r in zip(placebo, real, strict=True))  # no row kept its own
    result = adapters.read_manifest(layout.warmup_adapter_of("warmup+placebo"))
    real_result = adapters.read_manifest(layout.warmup_adapter_of("warmup"))
    assert result["schedule"]["optimizer_steps"] == real_result["schedule"]["optimizer_steps"]  # same size and steps
    assert result["hyperparameters"] == real_result["hyperparameters"]


def test_placebo_cell_starts_from_the_placebo_warmup(controls_run):
    exp, layout, *_ = controls_run
    result = run_cell(exp, layout, Cell("titles", NO_TRAINING, "d2lora_placebo", 0, 0))
    placebo = adapters.read_manifest(layout.warmup_adapter_of("warmup+placebo"))["adapter_sha256"]
    assert result["adapter"]["sha256"] == placebo != adapters.read_manifest(layout.warmup_adapter)["adapter_sha256"]
    assert result["control"]["warmup_run"] == "warmup+placebo"


def test_lora_matched_takes_the_warmups_steps_plus_the_tasks(controls_run):
    exp, layout, _, lora, _ = controls_run
    matched = run_cell(exp, layout, Cell("titles", "sft", "lora_matched", 4, 0))
    warm = adapters.read_manifest(layout.warmup_adapter)["schedule"]["optimizer_steps"]
    assert warm == 2 and lora["train"]["steps"] == 2  # 4 warm-up rows and 4 task rows at a global batch of 2
    assert matched["train"]["steps"] == warm + lora["train"]["steps"]  # D2LoRA's task phase takes lora's steps
    assert {k: matched["control"][k] for k in ("control", "warmup", "warmup_steps", "task_steps", "optimizer_steps")} \
        == {"control": "lora_matched", "warmup": "warmup", "warmup_steps": 2, "task_steps": 2, "optimizer_steps": 4}
    assert matched["adapter"]["parent_sha256"] is None  # a fresh adapter, not the warm-up's
    # its budget: all its steps are its own phase's (no warm-up's added), as many in total as D2LoRA's
    d2lora = run_cell(exp, layout, Cell("titles", "sft", "d2lora", 4, 0))
    assert matched["budget"]["warmup"] is None and matched["budget"]["phase"]["steps"] == 4
    assert matched["budget"]["total"]["steps"] == d2lora["budget"]["total"]["steps"] == 4


def test_random_b_has_the_warmups_b_norms_and_vanillas_a(controls_run):
    exp, layout, _, _, vanilla_start = controls_run
    vanilla, random_b = type("Vanilla", (), {"state": vanilla_start}), StartState()
    result = run_cell(exp, layout, Cell("titles", "sft", "random_b", 4, 0), callbacks=[random_b])
    assert result["budget"]["warmup"] is None  # it reads the warm-up's B norms; it does not train from it
    norms = controls.b_norms(layout.warmup_adapter)
    warm, _ = adapters.load_adapter_state(layout.warmup_adapter)
    a_keys = [k for k in vanilla.state if "lora_A" in k]
    b_keys = [k for k in vanilla.state if "lora_B" in k]
    assert a_keys and b_keys and set(norms) == set(b_keys)
    for key in a_keys:
        assert torch.equal(random_b.state[key], vanilla.state[key])  # A from the cell's seed, as vanilla LoRA
    for key in b_keys:
        assert not vanilla.state[key].any()  # vanilla starts at B = 0
        assert float(random_b.state[key].norm()) == pytest.approx(norms[key], rel=1e-5) and norms[key] > 0
        assert not torch.allclose(random_b.state[key], warm[key])  # a draw, not the warm-up's B


def test_per_cell_warmups_differ_and_a_cell_of_seed_s_starts_from_warmup_s(tiny_model_dir, tiny_data, tmp_path):
    grid = [{"task": "titles", "methods": ["sft"], "n": [4], "seeds": [0, 1], "inits": ["d2lora"]}]
    exp = _experiment(tiny_experiment_dict(tiny_model_dir, tiny_data, tmp_path), tmp_path, grid, seeds="per_cell",
                      n=4)
    layout = RunLayout(exp.run_dir)
    results = {run.seed: run_warmup(exp, layout, run=run) for run in planned_warmups(exp)}
    assert results[0]["seed"] == 0 and results[1]["seed"] == 1
    assert results[0]["adapter"]["sha256"] != results[1]["adapter"]["sha256"]
    assert results[0]["data"]["subset_sha256"] != results[1]["data"]["subset_sha256"]  # its own data order
    start = StartState()
    run_cell(exp, layout, Cell("titles", "sft", "d2lora", 4, 1, warmup_per_seed=True), callbacks=[start])
    own, _ = adapters.load_adapter_state(layout.warmup_adapter_of("warmup-s1"))
    other, _ = adapters.load_adapter_state(layout.warmup_adapter_of("warmup-s0"))
    assert set(start.state) == set(own)
    assert all(torch.equal(start.state[k], own[k]) for k in own)  # bit for bit
    assert not all(torch.equal(start.state[k], other[k]) for k in other)


def test_slurm_submits_each_seeds_warmup_and_placebo_as_a_job_each_array_waiting_for_its_own(tmp_path):
    from d2lora_dist.sweep import slurm
    from d2lora_dist.sweep.plan import freeze_plan
    from tests.slurm_cluster import experiment_dict

    data = experiment_dict("controls", str(tmp_path))
    data["warmup"]["seeds"] = "per_cell"
    data["grid"][0]["inits"] = ["lora", "d2lora", "lora_matched", "d2lora_placebo", "random_b"]
    exp = experiment_from_dict(data)
    layout = RunLayout(exp.run_dir)
    cells = freeze_plan(exp, layout)
    steps, _ = slurm.plan_submission(exp, layout, cells, range(len(cells)))
    runs = ["warmup-s0", "warmup-s1", "warmup+placebo-s0", "warmup+placebo-s1"]
    after = {s.name: s.after for s in steps}
    assert [s.name for s in steps if s.name.startswith("warmup:")] == [f"warmup:{k}" for k in runs]
    assert all(after[f"array:{k}"] == ("afterok", (f"warmup:{k}",)) for k in runs)
    by_name = {s.name: s for s in steps}
    assert {cells[i].id for i in by_name["array:warmup-s1"].indices} == {"math-sft-d2lora-n8-s1",
                                                                       "math-sft-random_b-n8-s1"}
    assert {cells[i].id for i in by_name["array:vanilla"].indices} == {  # lora_matched waits for no warm-up
        f"math-sft-{init}-n8-s{s}" for init in ("lora", "lora_matched") for s in (0, 1)}
    assert "--warmup warmup+placebo-s1" in by_name["warmup:warmup+placebo-s1"].text


def test_a_placebo_of_one_row_is_refused_by_the_experiments_validation(tiny_experiment, tmp_path):
    with pytest.raises(InputError, match=r"d2lora_placebo shuffles .* needs warmup.n >= 2 \(got 1\)"):
        _experiment(tiny_experiment, tmp_path, CONTROL_GRID, n=1)
