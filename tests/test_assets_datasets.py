"""The data assets in the schemas of the hub datasets they stand in for (`d2lora_dist.assets.datasets`),
converted from the real pinned archives."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.assets_fixtures import fetch_data, rows, session_cache


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return fetch_data(session_cache(tmp_path_factory))


def test_gsm8k_is_the_full_test_split(data: dict[str, Path]) -> None:
    table = rows(data["gsm8k"])
    assert len(table) == 1319
    assert all(set(r) == {"question", "answer"} for r in table)
    finals = [r["answer"].rsplit("####", 1) for r in table]
    assert all(len(f) == 2 and f[1].strip().replace(",", "").lstrip("-").isdigit() for f in finals)
    assert table[0]["question"].startswith("Janet’s ducks lay 16 eggs per day")
    assert table[0]["answer"].endswith("#### 18")


def test_arc_easy_has_the_ai2_arc_schema(data: dict[str, Path]) -> None:
    table = rows(data["arc_easy"])
    assert len(table) == 2376
    assert len({r["id"] for r in table}) == 2376
    for r in table:
        assert set(r) == {"id", "question", "choices", "answerKey"}
        assert len(r["choices"]["text"]) == len(r["choices"]["label"]) >= 3
        assert r["answerKey"] in r["choices"]["label"]
        assert r["question"] and not r["question"].startswith("Question:")


def test_arc_challenge_is_the_whole_test_split_in_the_ai2_arc_schema(data: dict[str, Path]) -> None:
    from d2lora_dist.config import DatasetRef
    from d2lora_dist.data.loading import normalize

    table = rows(data["arc_challenge"])
    assert len(table) == len({r["id"] for r in table}) == 1172
    assert not {r["id"] for r in table} & {r["id"] for r in rows(data["arc_easy"])}  # another set of questions
    assert table[0]["question"].startswith("An astronomer observes that a planet rotates faster")
    assert table[0]["answerKey"] == "C" and table[0]["choices"]["text"][2] == "Planetary days will become shorter."
    for r in table:
        assert set(r) == {"id", "question", "choices", "answerKey"}
        assert len(r["choices"]["text"]) == len(r["choices"]["label"]) >= 3
        assert r["answerKey"] in r["choices"]["label"] and not r["question"].startswith("Question:")
    # the registered dataset reads it as suite items, every row usable
    items = normalize(DatasetRef(name="arc_challenge", data_files=[str(data["arc_challenge"])]), "eval")
    assert items.total_rows == len(items.records) == 1172


def test_titles_are_distinct_papers(data: dict[str, Path]) -> None:
    table = rows(data["titles"])
    assert len({r["id"] for r in table}) == len(table) >= 200
    for r in table:
        assert set(r) == {"id", "abstract", "title"}
        assert "_" not in r["id"] and len(r["abstract"]) > len(r["title"]) > 0


def test_alpaca_demo(data: dict[str, Path]) -> None:
    table = rows(data["alpaca_demo"])
    assert len(table) == 999
    assert all(set(r) == {"instruction", "input", "output"} and r["instruction"] and r["output"] for r in table)


def test_dpo_demo_has_the_orpo_dpo_mix_schema(data: dict[str, Path]) -> None:
    table = rows(data["dpo_demo"])
    assert len(table) == 300
    for r in table:
        assert set(r) == {"source", "prompt", "chosen", "rejected"}
        assert r["source"] == "llamafactory/dpo_en_demo"
        chosen, rejected = r["chosen"], r["rejected"]
        assert chosen[:-1] == rejected[:-1]  # the same conversation, two answers
        assert chosen[-1]["role"] == rejected[-1]["role"] == "assistant"
        assert chosen[-1]["content"] != rejected[-1]["content"]
        talk = [m["role"] for m in chosen if m["role"] != "system"]
        assert [m["role"] for m in chosen[: len(chosen) - len(talk)]] in ([], ["system"])
        assert talk == ["user", "assistant"] * (len(talk) // 2)  # user first, then alternating
        assert r["prompt"] == chosen[-2]["content"]
    assert sum(len(r["chosen"]) > 2 for r in table) > 0  # multi-turn rows keep their history
