"""Experiment files: shipped presets load and plan; bad input names the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from d2lora_dist.config import experiment_from_dict, load_experiment
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep.grid import plan_cells
from tests.conftest import REPO, write_experiment

SHIPPED = sorted((REPO / "launch" / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_experiment_loads_validates_and_plans(path: Path) -> None:
    exp = load_experiment(path)
    cells = plan_cells(exp)
    assert cells, f"{path.name} plans no cells"
    assert len({c.id for c in cells}) == len(cells)
    for cell in cells:
        assert cell.task in exp.tasks and (cell.n == 0 or cell.method in exp.methods)


def test_paper_presets_carry_the_papers_values() -> None:
    math = load_experiment(REPO / "launch/experiments/paper_math.yaml")
    assert math.model.name_or_path == "meta-llama/Llama-3.1-8B-Instruct"
    assert (math.lora.r, math.lora.alpha) == (16, 16)
    assert (math.warmup.train.learning_rate, math.warmup.train.epochs) == (1e-7, 1)
    assert (math.methods["sft"].learning_rate, math.methods["sft"].epochs) == (1e-6, 3)
    for m in ("dpo", "orpo"):
        assert (math.methods[m].learning_rate, math.methods[m].epochs, math.methods[m].beta) == (1e-6, 4, 0.1)
    ns = {c.n for c in plan_cells(math)}
    assert {0, 1000, 2000, 5000, 10000} <= ns and {n for n in ns if 0 < n < 1000}
    # n = 0 is evaluated once per init, whatever the method
    assert sorted(c.id for c in plan_cells(math) if c.n == 0) == ["math-none-d2lora-n0-s0", "math-none-lora-n0-s0"]
    title = load_experiment(REPO / "launch/experiments/paper_title.yaml")
    assert title.tasks["titles"].holdout == 100 and title.suites["titles"].dataset is None


def test_unknown_keys_are_named_with_the_file(tiny_experiment: dict, tmp_path: Path) -> None:
    tiny_experiment["lora"]["rank"] = 8
    tiny_experiment["methods"]["dpo"]["betta"] = 0.2
    path = write_experiment(tiny_experiment, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    text = str(err.value)
    assert str(path) in text
    assert "lora.rank: unknown key" in text and "valid keys: alpha, dropout, r, target_modules" in text
    assert "methods.dpo.betta: unknown key" in text  # all problems reported at once


def test_type_and_cross_field_problems_are_all_reported(tiny_experiment: dict) -> None:
    tiny_experiment["lora"]["r"] = "sixteen"
    tiny_experiment["methods"]["dpo"].pop("beta")
    tiny_experiment["tasks"]["math"]["suites"].append("mmlu")
    tiny_experiment["grid"][0]["n"] = [-5]
    del tiny_experiment["warmup"]
    tiny_experiment["model"]["dtype"] = "fp8"
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(tiny_experiment, "exp.yaml")
    problems = err.value.problems
    expected = ["lora.r: expected int, got 'sixteen'", "methods.dpo.beta: required", "unknown suite 'mmlu'",
                "grid[0].n: -5 must be >= 0", "d2lora needs a `warmup` section", "model.dtype: 'fp8' is not one of"]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)


def test_missing_required_key_and_missing_file(tiny_experiment: dict, tmp_path: Path) -> None:
    del tiny_experiment["model"]
    with pytest.raises(ConfigError, match="model: required key is missing"):
        experiment_from_dict(tiny_experiment)
    with pytest.raises(ConfigError, match="experiment file not found"):
        load_experiment(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_experiment(tmp_path / "broken.yaml")


def test_set_overrides_parse_yaml_values_and_reject_bad_syntax(tiny_experiment: dict, tmp_path: Path) -> None:
    path = write_experiment(tiny_experiment, tmp_path / "exp.yaml")
    exp = load_experiment(path, ["methods.dpo.beta=0.25", "lora.r=8",
                                 "methods.dpo.reference=base"])
    assert exp.methods["dpo"].beta == 0.25 and exp.lora.r == 8 and exp.methods["dpo"].reference == "base"
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_experiment(path, ["lora.r"])
    with pytest.raises(ConfigError, match="lora.rr: unknown key"):
        load_experiment(path, ["lora.rr=3"])
    with pytest.raises(ConfigError, match="methods.dpo.reference: 'ref' is not one of"):
        load_experiment(path, ["methods.dpo.reference=ref"])


def test_preference_method_on_a_dataset_without_preference_form(tiny_experiment: dict) -> None:
    tiny_experiment["tasks"]["chat"] = {"dataset": {"name": "alpaca", "data_files": ["chat.jsonl"]},
                                        "suites": ["arc_easy"]}
    tiny_experiment["grid"] = [{"task": "chat", "methods": ["dpo"], "n": [4]}]
    with pytest.raises(ConfigError, match="has no preference form for method 'dpo'"):
        experiment_from_dict(tiny_experiment)


def test_resolved_experiment_round_trips_through_yaml(tiny_experiment: dict) -> None:
    exp = experiment_from_dict(tiny_experiment)
    again = experiment_from_dict(yaml.safe_load(yaml.safe_dump(exp.to_dict())))
    assert again == exp


def test_batch_seed_and_dropout_settings_are_checked(tiny_experiment: dict) -> None:
    tiny_experiment["methods"]["sft"]["gradient_accumulation_steps"] = 4  # replaced by global_batch_size
    tiny_experiment["methods"]["dpo"].update(min_steps=-1, lora_dropout=1.5)
    del tiny_experiment["methods"]["orpo"]["global_batch_size"]
    tiny_experiment["lora"]["dropout"] = -0.1
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(tiny_experiment)
    problems = err.value.problems
    assert any(p.startswith("methods.sft.gradient_accumulation_steps: unknown key") and "global_batch_size" in p
               for p in problems)
    assert "methods.dpo.min_steps: must be >= 0, got -1" in problems
    assert "methods.dpo.lora_dropout: must be in [0, 1) or null, got 1.5" in problems
    assert "methods.orpo.global_batch_size: required key is missing" in problems
    assert "lora.dropout: must be in [0, 1), got -0.1" in problems


def test_presets_state_the_global_batch_the_warmup_seed_and_each_methods_target() -> None:
    math = load_experiment(REPO / "launch/experiments/paper_math.yaml")
    assert {m: s.global_batch_size for m, s in math.methods.items()} == {"sft": 32, "dpo": 32, "orpo": 32}
    assert math.warmup.seed == 0 and math.warmup.train.global_batch_size == 32
    assert math.methods["dpo"].preference_target == "step" and math.methods["orpo"].preference_target == "full"
    assert all(s.min_steps == 16 for s in math.methods.values())
    assert math.suites["gsm8k"].answer_filter == "flexible"


def test_warmup_names_that_would_break_ids_or_clash_with_the_vanilla_array_are_refused(tiny_experiment: dict) -> None:
    warmup = tiny_experiment.pop("warmup")
    tiny_experiment["warmups"] = {"M8": warmup, "vanilla": warmup, "m32": warmup}
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(tiny_experiment)
    assert "warmups.M8: the name must be lower-case letters" in str(err.value)
    assert "warmups.vanilla: the name is taken (Slurm's array of vanilla cells is `vanilla`)" in str(err.value)
    assert "m32" not in str(err.value)


def test_an_unregistered_dataset_name_is_named_by_its_key(tiny_experiment: dict) -> None:
    tiny_experiment["tasks"]["math"]["dataset"]["name"] = "math_stepdpo"
    tiny_experiment["suites"]["gsm8k"]["dataset"]["name"] = "gsm"
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(tiny_experiment)
    registered = "alpaca, arc_challenge, arc_easy, econ_abstracts, gsm8k, math_step_dpo, orpo_dpo_mix"
    assert f"tasks.math.dataset.name: unknown dataset 'math_stepdpo' (registered: {registered})" in err.value.problems
    assert f"suites.gsm8k.dataset.name: unknown dataset 'gsm' (registered: {registered})" in err.value.problems


@pytest.mark.parametrize("preset", ["paper_math", "paper_title"])
def test_paper_presets_run_their_primary_comparison_on_min_seeds_seeds(preset: str) -> None:
    """A primary comparison on fewer than report.min_seeds seeds is never resolved: the presets that
    declare one must train both of its arms on that many seeds."""
    exp = load_experiment(REPO / f"launch/experiments/{preset}.yaml")
    assert exp.report.primary
    for p in exp.report.primary:
        for init in ("lora", "d2lora"):
            seeds = {c.seed for c in plan_cells(exp)
                     if (c.task, c.method, c.n, c.init) == (p.task, p.method, p.n, init)}
            assert len(seeds) >= exp.report.min_seeds, (init, sorted(seeds))
