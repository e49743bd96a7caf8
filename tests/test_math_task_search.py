"""benchmarks/math_task_search.py without a model: its settings parser, the Wilson interval, and the
extraction + generator scoring of hand-written completions through the pinned reasoning-gym wheel."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from d2lora_dist.assets.pypi import ARCHIVES, fetch_archive
from d2lora_dist.errors import InputError

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "math_task_search.py"
SEED = 10_000


@pytest.fixture(scope="module")
def search() -> ModuleType:
    spec = importlib.util.spec_from_file_location("math_task_search", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generators(search: ModuleType, cache: Path, tmp_path_factory: pytest.TempPathFactory) -> object:
    wheel = fetch_archive(ARCHIVES["reasoning-gym"], cache, progress=False)
    return search.Generators(wheel, tmp_path_factory.mktemp("rg-wheel"))


def test_scoring_uses_the_generators_scorer_and_counts_only_full_credit(search: ModuleType,
                                                                         generators: object) -> None:
    setting = search.parse_setting("gcd:min_value=1,max_value=20")
    items = generators.run(setting, SEED, 4)["items"]
    assert [i["answer"] for i in items] == ["2", "9", "4", "3"]  # the seeded problems are fixed
    completions = [
        "Both are even and share no other factor.\nThe answer is 2.",
        "The answer is 19.",  # reasoning-gym's default scorer gives "9" in "19" partial credit (0.5)
        "The common divisors are 1, 2 and 4, so the GCD is 4",  # no marker: only the flexible filter finds it
        "The answer is 3. Let me check: 3 divides both.",
    ]
    rows = search.score_completions(setting, generators, SEED, completions)
    assert [(r["strict"], r["flexible"]) for r in rows] == [("2", "2"), ("19", "19"), (None, "4"), ("3", "3")]
    assert rows[1]["score"] == 0.5
    assert [r["correct"] for r in rows] == [True, False, True, True]
    assert [r["correct_strict"] for r in rows] == [True, False, False, True]
    assert [r["reference"] for r in rows] == ["2", "9", "4", "3"]


def test_scoring_accepts_written_forms_of_the_same_number(search: ModuleType, generators: object) -> None:
    setting = search.parse_setting("chain_sum:min_terms=2,max_terms=2,min_digits=2,max_digits=2")
    completions = ["98 + 25 = 123.\nThe answer is 123.", "The answer is 38.", "The answer is $109.00",
                   "63 - 31 = 32"]
    rows = search.score_completions(setting, generators, SEED, completions)
    assert [r["reference"] for r in rows] == ["123", "-38", "109", "32"]
    assert [r["correct"] for r in rows] == [True, False, True, True]
    assert [r["correct_strict"] for r in rows] == [True, False, True, False]

    summary = search.summarize([{**r, "tokens": t} for r, t in zip(rows, [10, 5, 7, 16], strict=True)],
                               max_new_tokens=16, seconds=1.0)
    assert (summary["correct"], summary["n"], summary["accuracy_strict"]) == (3, 4, 0.5)
    assert summary["cut_share"] == 0.25 and summary["mean_tokens"] == 9.5


def test_summarize_rebuilds_the_table_from_out_files(search: ModuleType, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    rows = [{"correct": c, "correct_strict": c, "tokens": 5} for c in (True, False, False, False)]
    result = {"generator": "gcd", "config": {"max_value": 20}, "summary": search.summarize(rows, 16, 2.0)}
    out = tmp_path / "items.json"
    out.write_text(json.dumps({"meta": {}, "settings": [result]}))
    assert search.main(["--summarize", str(out)]) == 0
    assert "| gcd | max_value=20 | 1/4 = 25% | 5%–70% | 25% | 5 | 0% | 2 |" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("{}")
    assert search.main(["--summarize", str(tmp_path / "bad.json")]) == 2
    assert f"--summarize {tmp_path / 'bad.json'}: not a math_task_search --out file" in capsys.readouterr().err


def test_a_bad_knob_names_the_setting(search: ModuleType, generators: object) -> None:
    with pytest.raises(InputError, match=r"--setting gcd:no_such_knob=1: the reasoning-gym generator failed"):
        generators.run(search.parse_setting("gcd:no_such_knob=1"), SEED, 1)


def test_parse_setting(search: ModuleType) -> None:
    s = search.parse_setting('basic_arithmetic:operators=["+","-"], allow_parentheses=false,min_terms=2,style=x')
    assert s.generator == "basic_arithmetic"
    assert s.config == {"operators": ["+", "-"], "allow_parentheses": False, "min_terms": 2, "style": "x"}
    assert search.parse_setting("gsm_symbolic").config == {}
    for bad in ("gcd:min_value", ":min_value=1", "gcd:=3"):
        with pytest.raises(InputError, match="--setting"):
            search.parse_setting(bad)


def test_wilson_interval(search: ModuleType) -> None:
    assert search.wilson_interval(0, 40) == pytest.approx((0.0, 0.0876), abs=1e-4)
    assert search.wilson_interval(20, 40) == pytest.approx((0.3520, 0.6480), abs=1e-4)
    assert search.wilson_interval(40, 40) == pytest.approx((0.9124, 1.0), abs=1e-4)
    assert search.wilson_interval(0, 0) == (0.0, 1.0)


def test_bad_arguments_exit_2_and_keep_existing_files(search: ModuleType, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "items.json"
    out.write_text("earlier results")
    assert search.main(["--out", str(out)]) == 2
    assert out.read_text() == "earlier results"
    assert search.main(["--setting", "no_such_task"]) == 2
    assert search.main(["--k", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{out} exists" in err and "unknown generator(s) ['no_such_task']" in err and "--k" in err
