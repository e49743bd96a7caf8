"""Dataset registry, normalisation, bad rows, local formats and nested subsets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2lora_dist.config import DatasetRef
from d2lora_dist.data.check import check_dataset
from d2lora_dist.data.loading import DataError, normalize
from d2lora_dist.data.registry import REGISTRY
from d2lora_dist.data.subsets import holdout_indices, take_subset
from tests.conftest import chat_pair_rows, math_rows


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_registry_names_real_hub_ids() -> None:
    hub = {name: (spec.hub_id, spec.hub_config, spec.split) for name, spec in REGISTRY.items()}
    assert hub["orpo_dpo_mix"][0] == "mlabonne/orpo-dpo-mix-40k"
    assert hub["math_step_dpo"][0] == "xinlai/Math-Step-DPO-10K"
    assert hub["econ_abstracts"][0] == "onurkeles/econ_paper_abstracts"
    assert hub["gsm8k"] == ("openai/gsm8k", "main", "test")
    assert hub["arc_easy"] == ("allenai/ai2_arc", "ARC-Easy", "test")


def test_math_step_forms(tmp_path: Path) -> None:
    ref = DatasetRef("math_step_dpo", data_files=[_jsonl(tmp_path / "m.jsonl", math_rows(3))])
    sft = normalize(ref, "sft").records[0]
    assert sft["prompt"] == [{"role": "user", "content": math_rows(3)[0]["prompt"]}]
    row = math_rows(3)[0]
    assert sft["completion"][0]["content"] == row["initial_reason_steps"] + row["full_chosen"]
    pref = normalize(ref, "preference").records[0]
    # both targets are kept; the shared steps are the prompt side's (docs/preference-targets.md)
    assert pref["prompt"] == sft["prompt"] and pref["prefix"] == row["initial_reason_steps"]
    assert (pref["chosen_step"], pref["rejected_step"]) == (row["chosen"], row["rejected"])
    assert (pref["chosen_full"], pref["rejected_full"]) == (row["full_chosen"], row["full_rejected"])


def test_bad_rows_are_counted_by_reason_with_row_ids(tmp_path: Path) -> None:
    rows = chat_pair_rows(6)
    rows[1]["chosen"] = "[not json"
    rows[2]["rejected"] = [rows[2]["rejected"][0], {"role": "assistant", "content": rows[2]["chosen"][1]["content"]}]
    rows[3]["chosen"] = [rows[3]["chosen"][0], {"role": "assistant", "content": "  "}]
    del rows[4]["rejected"]
    ref = DatasetRef("orpo_dpo_mix", data_files=[_jsonl(tmp_path / "p.jsonl", rows)])
    data = normalize(ref, "preference")
    assert sorted(data.records) == [0, 5]
    assert data.bad == {"unparseable chosen messages": ["row-1"], "chosen == rejected": ["row-2"],
                        "empty chosen response": ["row-3"], "missing rejected": ["row-4"]}
    report = check_dataset(ref)
    assert report["rows"] == 6 and report["forms"]["preference"]["invalid_rows"] == 4
    assert report["forms"]["sft"]["valid_rows"] == 4  # chosen == rejected is fine for SFT
    strict = DatasetRef("orpo_dpo_mix", data_files=ref.data_files, strict=True)
    with pytest.raises(DataError, match="bad row row-1: unparseable chosen messages"):
        normalize(strict, "preference")


def test_missing_column_is_named_and_columns_can_be_mapped(tmp_path: Path) -> None:
    rows = [{"paper_abstract": f"abstract {i} about adapters", "paper_title": f"Title {i}"} for i in range(4)]
    files = [_jsonl(tmp_path / "t.jsonl", rows)]
    with pytest.raises(DataError, match=r"missing column\(s\) \['abstract', 'title'\].*paper_abstract"):
        normalize(DatasetRef("econ_abstracts", data_files=files), "sft")
    mapped = DatasetRef("econ_abstracts", data_files=files,
                        columns={"abstract": "paper_abstract", "title": "paper_title"})
    assert normalize(mapped, "eval").records[2]["title"] == "Title 2"
    with pytest.raises(DataError, match="column 'headline' \\(for title\\) not in"):
        normalize(DatasetRef("econ_abstracts", data_files=files, columns={"title": "headline"}), "sft")


def test_parquet_and_saved_dataset_dir_load_like_jsonl(tmp_path: Path) -> None:
    import datasets

    table = datasets.Dataset.from_list(math_rows(5))
    table.to_parquet(str(tmp_path / "m.parquet"))
    datasets.DatasetDict({"train": table}).save_to_disk(str(tmp_path / "saved"))
    from_parquet = normalize(DatasetRef("math_step_dpo", data_files=[str(tmp_path / "m.parquet")]), "sft")
    from_disk = normalize(DatasetRef("math_step_dpo", data_files=[str(tmp_path / "saved")], split="train"), "sft")
    assert from_parquet.records == from_disk.records and len(from_disk.records) == 5
    with pytest.raises(DataError, match="data file not found"):
        normalize(DatasetRef("math_step_dpo", data_files=[str(tmp_path / "missing.jsonl")]), "sft")
    with pytest.raises(DataError, match="no split 'validation'"):
        normalize(DatasetRef("math_step_dpo", data_files=[str(tmp_path / "saved")], split="validation"), "sft")


def test_unknown_dataset_name_lists_registered_ones() -> None:
    with pytest.raises(KeyError, match="registered: alpaca, arc_challenge, arc_easy, econ_abstracts"):
        normalize(DatasetRef("mmlu"), "eval")


def test_subsets_are_nested_within_a_seed_and_disjoint_from_the_holdout(tmp_path: Path) -> None:
    ref = DatasetRef("math_step_dpo", data_files=[_jsonl(tmp_path / "m.jsonl", math_rows(50))])
    data = normalize(ref, "preference")
    small, large = take_subset(data, 10, 3, 0, holdout=5), take_subset(data, 30, 3, 0, holdout=5)
    assert large.indices[:10] == small.indices
    assert not set(large.indices) & set(holdout_indices(50, 3, 5))
    assert take_subset(data, 10, 3, 0, holdout=5).sha256 == small.sha256  # reproducible
    assert take_subset(data, 10, 4, 0, holdout=5).indices != small.indices  # the data seed matters
    # the same rows serve SFT and preference methods (and both inits: the cell's seed alone decides)
    assert take_subset(normalize(ref, "sft"), 10, 3, 0, holdout=5).indices == small.indices
    with pytest.raises(DataError, match="asked for n=46 preference examples but only 45 usable rows"):
        take_subset(data, 46, 3, 0, holdout=5)


def test_another_seed_draws_other_rows_but_never_the_holdout(tmp_path: Path) -> None:
    data = normalize(DatasetRef("math_step_dpo", data_files=[_jsonl(tmp_path / "m.jsonl", math_rows(50))]),
                     "preference")
    held = set(holdout_indices(50, 3, 5))
    subsets = {seed: take_subset(data, 10, 3, seed, holdout=5) for seed in (0, 1, 2)}
    assert len({tuple(s.indices) for s in subsets.values()}) == 3
    assert all(not set(s.indices) & held for s in subsets.values())
    for seed, subset in subsets.items():  # nested within each seed
        assert take_subset(data, 20, 3, seed, holdout=5).indices[:10] == subset.indices
        assert subset.seed == seed


def test_eval_forms(tmp_path: Path) -> None:
    arc = [{"id": "q1", "question": "Which is a gas?", "choices": {"text": ["rock", "steam"], "label": ["A", "B"]},
            "answerKey": "B"},
           {"id": "q2", "question": "Bad key?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"}]
    data = normalize(DatasetRef("arc_easy", data_files=[_jsonl(tmp_path / "a.jsonl", arc)]), "eval")
    assert data.records[0] == {"id": "q1", "question": "Which is a gas?", "choices": ["rock", "steam"],
                               "labels": ["A", "B"], "answer_index": 1}
    assert data.bad == {"answerKey not among the choice labels": ["q2"]}
    gsm = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "2+2?", "answer": "4"}]
    data = normalize(DatasetRef("gsm8k", data_files=[_jsonl(tmp_path / "g.jsonl", gsm)]), "eval")
    assert list(data.records) == [0] and data.bad == {"answer has no '#### N' final answer": ["row-1"]}


def test_title_preference_rejects_the_abstract_opening_or_a_given_rejected_title(tmp_path: Path) -> None:
    abstract = "We study low rank adapters for small language models and find that warm starts help."
    rows = [{"abstract": abstract, "title": "Warm Starts for Low Rank Adapters"},
            {"abstract": abstract, "title": "Adapters", "rejected_title": "A Study"},
            {"abstract": "Short one here.", "title": "Short one here."},  # the opening IS the title
            {"abstract": abstract, "title": "Adapters", "rejected_title": "  "}]
    result = normalize(DatasetRef("econ_abstracts", data_files=[_jsonl(tmp_path / "t.jsonl", rows)]), "preference")
    first, second = result.records[0], result.records[1]
    assert first["chosen"] == [{"role": "assistant", "content": "Warm Starts for Low Rank Adapters"}]
    # as many words as the title (6), never fewer than 4
    assert first["rejected"] == [{"role": "assistant", "content": "We study low rank adapters for"}]
    assert second["rejected"][0]["content"] == "A Study"
    assert first["prompt"] == normalize(DatasetRef("econ_abstracts", data_files=[_jsonl(tmp_path / "u.jsonl", rows[:1])]),
                                        "sft").records[0]["prompt"]
    assert sorted(result.records) == [0, 1]
    assert result.bad == {"chosen == rejected": ["row-2"], "rejected_title is not text": ["row-3"]}
