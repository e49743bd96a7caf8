"""The validation split: held out of every training subset, disjoint from the test holdout, the same for all."""

from __future__ import annotations

import pytest

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.data.loading import DataError, normalize
from d2lora_dist.data.selection import suite_items, task_records, validation_items
from d2lora_dist.data.subsets import holdout_indices


def _exp(tiny_experiment: dict, validation: int = 6):
    tiny_experiment["tasks"]["titles"]["validation"] = validation
    tiny_experiment["suites"]["titles_val"] = {"kind": "titles", "split": "validation", "limit": 3}
    return experiment_from_dict(tiny_experiment)


def test_validation_rows_are_disjoint_from_the_test_items_and_every_seeds_training_rows(tiny_experiment: dict):
    exp = _exp(tiny_experiment)
    items, record = validation_items(exp, "titles")
    again = validation_items(exp, "titles")[1]
    assert record == again and len(record["indices"]) == 6 == len(items)  # one draw, whoever asks
    validation = set(record["indices"])
    data = normalize(exp.tasks["titles"].dataset, "eval")
    test = set(holdout_indices(data.total_rows, exp.data_seed, exp.tasks["titles"].holdout))
    assert len(test) == 6 and not validation & test
    test_titles = {item["title"] for item in suite_items(exp, "titles", "titles")}
    assert not test_titles & {item["title"] for item in items}
    assert {item["title"] for item in suite_items(exp, "titles_val", "titles")} == {item["title"] for item in items}
    for seed in range(4):  # every seed's largest subset: all usable rows (24 - 6 test - 6 validation)
        _, subset = task_records(exp, "titles", "sft", 12, seed)
        assert not set(subset.indices) & (validation | test)
    with pytest.raises(DataError, match="only 12 usable rows"):
        task_records(exp, "titles", "sft", 13, 0)


def test_without_validation_the_training_rows_are_as_before(tiny_experiment: dict):
    with_split, without = _exp(tiny_experiment), experiment_from_dict({**tiny_experiment, "tasks": {
        **tiny_experiment["tasks"], "titles": {**tiny_experiment["tasks"]["titles"], "validation": 0}}})
    for seed in range(3):
        plain = task_records(without, "titles", "sft", 8, seed)[1].indices
        assert plain == task_records(experiment_from_dict(_base(tiny_experiment)), "titles", "sft", 8, seed)[1].indices
        assert task_records(with_split, "titles", "sft", 8, seed)[1].indices != plain  # 6 rows fewer to draw from
    with pytest.raises(DataError, match="holds none out"):
        validation_items(without, "titles")


def _base(data: dict) -> dict:
    out = {**data, "tasks": {**data["tasks"], "titles": dict(data["tasks"]["titles"])}}
    out["tasks"]["titles"].pop("validation", None)
    out["suites"] = {k: v for k, v in data["suites"].items() if k != "titles_val"}
    return out
