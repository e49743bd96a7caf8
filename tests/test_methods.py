"""The method registry: one entry is all a new method needs for validation, the CLI, the plan and the report."""

from __future__ import annotations

import pytest

from d2lora_dist import methods
from d2lora_dist.cli import build_parser
from d2lora_dist.config import experiment_from_dict
from d2lora_dist.report.collect import Collection, Row
from d2lora_dist.report.tables import table_specs
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep.grid import plan_cells


@pytest.fixture
def cpo(monkeypatch: pytest.MonkeyPatch) -> methods.MethodSpec:
    """A dummy preference method, registered the way a real one would be: one entry."""
    spec = methods.MethodSpec("CPO", "preference", methods.METHODS["dpo"].classes, lambda s: {}, True)
    monkeypatch.setitem(methods.METHODS, "cpo", spec)
    return spec


def test_one_registry_entry_makes_validation_cli_plan_and_report_accept_a_method(cpo, tiny_experiment: dict) -> None:
    tiny_experiment["methods"]["cpo"] = {**tiny_experiment["methods"]["dpo"]}
    tiny_experiment["grid"][0]["methods"] = ["sft", "cpo"]
    exp = experiment_from_dict(tiny_experiment)  # validation
    args = build_parser().parse_args(["adapt", "-c", "x.yaml", "--task", "math", "--method", "cpo",
                                      "--init", "d2lora", "--n", "4"])  # the CLI's choices
    assert args.method == "cpo"
    cells = plan_cells(exp)  # the plan
    assert {c.id for c in cells} >= {"math-cpo-lora-n4-s0", "math-cpo-d2lora-n4-s0"}
    done = next(c for c in cells if c.id == "math-cpo-lora-n4-s0")
    coll = Collection(cells, {done.id: done}, [Row(done.id, "math", "cpo", "lora", 4, 0, "gsm8k", "task",
                                                   "accuracy", 0.5)])
    titles = [spec.title for spec in table_specs(exp, coll)]  # the report
    assert "math · CPO · gsm8k (task suite)" in titles


def test_a_method_missing_from_the_registry_is_refused_everywhere(tiny_experiment: dict) -> None:
    tiny_experiment["methods"]["cpo"] = {**tiny_experiment["methods"]["dpo"]}
    tiny_experiment["grid"][0]["methods"] = ["cpo"]
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(tiny_experiment)
    assert "methods.cpo: unknown method (valid: sft, dpo, orpo, kto)" in err.value.problems
    assert "grid[0].methods: unknown method 'cpo' (valid: sft, dpo, orpo, kto)" in err.value.problems
    with pytest.raises(SystemExit):
        build_parser().parse_args(["adapt", "-c", "x.yaml", "--task", "math", "--method", "cpo", "--init", "lora",
                                   "--n", "4"])


def test_preference_methods_need_beta_by_their_record_form(cpo, tiny_experiment: dict) -> None:
    tiny_experiment["methods"]["cpo"] = {k: v for k, v in tiny_experiment["methods"]["dpo"].items() if k != "beta"}
    with pytest.raises(ConfigError, match="methods.cpo.beta: required for cpo"):
        experiment_from_dict(tiny_experiment)
