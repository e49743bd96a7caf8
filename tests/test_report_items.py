"""items.csv: a report rebuilt from it alone has the same tables; bad items.csv lines are named; cells
made by different prompt or scorer versions are refused unless allowed; n_trained is shown beside n."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from d2lora_dist.cli import main
from d2lora_dist.errors import InputError
from d2lora_dist.report import report, report_from_items
from d2lora_dist.report.items import COLUMNS, read_items_csv, render_items_csv
from d2lora_dist.report.versions import MixedVersions
from tests.test_report import MATH, math_items, table, write_cell, write_run

TABLES = ("results.csv", "deltas.csv", "results.md")


@pytest.fixture
def run(tmp_path):
    return write_run(tmp_path)


@pytest.fixture
def no_plots(monkeypatch):
    """Tests of the numbers skip drawing."""
    monkeypatch.setattr("d2lora_dist.report.write_plots", lambda *args, **kwargs: [])


def rebuilt(layout, tmp_path: Path, name: str = "rebuilt") -> Path:
    out = tmp_path / name
    report_from_items(layout.report_dir / "items.csv", out)
    return out


def assert_same_tables(a: Path, b: Path) -> None:
    for name in TABLES:
        assert (a / name).read_text() == (b / name).read_text(), name


def set_result(layout, cell_id: str, **changes) -> None:
    path = layout.cell_result(cell_id)
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


# ---- rebuilding ----------------------------------------------------------------------------------

def test_report_rebuilt_from_items_csv_alone_has_identical_tables(run, tmp_path):
    exp, layout = run
    # Cells the rebuild must reproduce exactly: one without predictions (seed level, with its note),
    # one whose item scores disagree with its result.json, and one the plan does not list.
    layout.cell_predictions("math-sft-lora-n100-s1", "gsm8k").unlink()
    path = layout.cell_predictions("math-sft-lora-n1000-s0", "gsm8k")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[60] |= {"correct": True, "correct_strict": True, "correct_flexible": True}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_cell(layout, "math-orpo-lora-n5-s0", math_items("math-orpo-lora-n5-s0", 0.3, 0.5))
    set_result(layout, "math-sft-d2lora-n100-s0", n_trained=97)
    first = report(exp, layout)
    assert first.items_path == layout.report_dir / "items.csv" and first.unplanned == ["math-orpo-lora-n5-s0"]
    out = rebuilt(layout, tmp_path)
    assert_same_tables(layout.report_dir, out)
    assert sorted(p.name for p in (out / "plots").iterdir()) == sorted(p.name for p in first.plots)
    notes = (out / "results.md").read_text().split("## Notes on Δ", 1)[1]
    assert "cells/math-sft-lora-n100-s1/predictions/gsm8k.jsonl: missing" in notes
    assert "item scores of accuracy average 0.250000 but result.json says 0.240000" in notes


def test_items_csv_holds_each_cell_value_and_every_item_score(run, no_plots, tmp_path):
    exp, layout = run
    report(exp, layout)
    text = (layout.report_dir / "items.csv").read_text()
    with (layout.report_dir / "items.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == COLUMNS
    cell = [r for r in rows if r["cell"] == "math-sft-d2lora-n100-s1" and r["suite"] == "gsm8k"]
    value, items = cell[0], cell[1:]
    assert (value["item"], float(value["score"]), value["status"]) == ("", 0.28, "done")
    assert len(items) == 100 and sum(float(r["score"]) for r in items) == 28
    assert {(r["task"], r["method"], r["init"], r["arm"], r["n"], r["seed"], r["kind"], r["role"])
            for r in cell} == {("math", "sft", "d2lora", "d2lora", "100", "1", "gsm8k", "task")}
    missing = [r for r in rows if r["status"] == "missing"]
    assert len({r["cell"] for r in missing}) == len(missing) == 42 - len(MATH) - 3
    assert all(r["suite"] == r["score"] == "" for r in missing)
    study = read_items_csv(layout.report_dir / "items.csv")  # the file is what the reader reads back
    again = render_items_csv(study.view.name, {s: v.kind for s, v in study.view.suites.items()},
                             list(study.view.tasks), study.coll, study.scores, study.view.report)
    assert again == text


def test_real_tiny_run_rebuilt_from_items_csv(tiny_experiment: dict, tmp_path):
    """Cells trained and evaluated on the tiny model, then the report rebuilt from its items.csv."""
    from d2lora_dist.config import experiment_from_dict
    from d2lora_dist.layout import RunLayout
    from d2lora_dist.sweep.cell import run_cell
    from d2lora_dist.sweep.grid import plan_cells
    from d2lora_dist.warmup import run_warmup

    tiny_experiment["grid"] = [{"task": "titles", "methods": ["sft"], "inits": ["lora", "d2lora"], "n": [0, 4],
                                "seeds": [0]}]
    exp = experiment_from_dict(tiny_experiment)
    layout = RunLayout(exp.run_dir)
    run_warmup(exp, layout)
    for cell in plan_cells(exp):
        run_cell(exp, layout, cell)
    report(exp, layout)
    out = rebuilt(layout, tmp_path)
    assert_same_tables(layout.report_dir, out)
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {r["metric"] for r in rows if r["suite"] == "titles"} == {"rouge1", "rouge2", "rougeL", "bare_title"}
    assert {r["scorer_version"] for r in rows if r["suite"] == "titles"} == {"titles-extract-v2"}
    assert {r["n_trained"] for r in rows if r["n"] == "4"} == {"4"}
    assert all(r["code"].startswith(("git:", "d2lora-dist==")) for r in rows)


# ---- bad items.csv ---------------------------------------------------------------------------------

def items_lines(run) -> list[str]:
    exp, layout = run
    report(exp, layout)
    return (layout.report_dir / "items.csv").read_text().splitlines()


def first_item_line(lines: list[str]) -> int:
    """Index of the first per-item row (item column not empty) of a done cell."""
    return next(i for i, line in enumerate(lines[1:], start=1) if next(csv.reader([line]))[2])


def field_replaced(line: str, column: str, value: str) -> str:
    fields = next(csv.reader([line]))
    fields[COLUMNS.index(column)] = value
    buf = __import__("io").StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    return buf.getvalue()


@pytest.mark.parametrize("damage, message", [
    ("drop score", r"missing column\(s\) \['score'\]"),
    ("score abc", r":{line}: column 'score' is 'abc', not a number"),
    ("score nan", r":{line}: column 'score' is 'nan', not a finite number"),
    ("duplicate", r":{next}: duplicate row for \(cell, suite, item, metric\) = .*: line {line} has it too"),
    ("n x", r":{line}: column 'n' is 'x', not a whole number"),
    ("cell wrong", r":{line}: column 'cell' is 'wrong' but task, method, arm, n and seed make"),
    ("status maybe", r":{line}: column 'status' is 'maybe'; expected done, missing or unplanned"),
    ("value 1.5", r":{value}: column 'score' is '1.5': a cell's value is a fraction in \[0, 1\]"),
    ("short", r":{line}: expected 20 fields"),
])
def test_bad_items_csv_names_the_line_and_column(run, no_plots, tmp_path, capsys, damage, message):
    lines = items_lines(run)
    i = first_item_line(lines)
    what, _, arg = damage.partition(" ")
    if what == "drop":
        header = lines[0].split(",")
        k = header.index(arg)
        lines = [",".join(f for j, f in enumerate(next(csv.reader([line]))) if j != k) for line in lines]
    elif what == "duplicate":
        lines.insert(i + 1, lines[i])
    elif what == "short":
        lines[i] = lines[i].rsplit(",", 3)[0]
    elif what == "value":
        lines[i - 1] = field_replaced(lines[i - 1], "score", arg)
    else:
        lines[i] = field_replaced(lines[i], what, arg)
    bad = tmp_path / "items.csv"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    pattern = message.format(line=i + 1, next=i + 2, value=i)
    with pytest.raises(InputError, match=pattern):
        report_from_items(bad, out)
    assert main(["report", "--items", str(bad), "--out", str(out)]) == 2
    assert "d2lora: error:" in capsys.readouterr().err
    assert not out.exists()  # nothing written


def test_items_csv_without_or_with_a_broken_settings_row_is_refused_naming_it(run, no_plots, tmp_path):
    """The settings row carries report.min_seeds, the primary comparisons and the target effect: without
    it a rebuilt report would judge every Δ by other rules than the report it rebuilds."""
    lines = items_lines(run)
    assert next(csv.reader([lines[1]]))[COLUMNS.index("status")] == "settings"
    bad = tmp_path / "items.csv"
    bad.write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    with pytest.raises(InputError, match="no row of status 'settings'"):
        report_from_items(bad, tmp_path / "out")
    bad.write_text("\n".join([lines[0], field_replaced(lines[1], "note", '{"min_seeds": 2}'), *lines[2:]]) + "\n")
    with pytest.raises(InputError, match=r":2: column 'note' of the 'settings' row is not the report's settings"):
        report_from_items(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_command_rebuilds_from_items_and_checks_its_arguments(run, no_plots, tmp_path, capsys):
    exp, layout = run
    report(exp, layout)
    out = tmp_path / "from-items"
    assert main(["report", "--items", str(layout.report_dir / "items.csv"), "--out", str(out)]) == 0
    assert_same_tables(layout.report_dir, out)
    assert main(["report", "--items", str(layout.report_dir / "items.csv")]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert main(["report", "--items", str(tmp_path / "none.csv"), "--out", str(out)]) == 2
    assert "none.csv: no such items file" in capsys.readouterr().err
    assert main(["report"]) == 2
    assert "report needs -c/--config EXPERIMENT" in capsys.readouterr().err


# ---- versions and n_trained ----------------------------------------------------------------------

def test_cells_of_different_scorer_versions_are_refused_naming_them_unless_allowed(run, no_plots, tmp_path):
    exp, layout = run
    old, new = "titles-none-lora-n0-s0", "titles-none-d2lora-n0-s0"
    set_result(layout, new, labels={"titles": {"prompt_version": "titles-v1", "scorer_version": "titles-extract-v2"}})
    # the old cell records no scorer version: titles results without one were scored by titles-extract-v1
    set_result(layout, old, labels={"titles": {"prompt_version": "titles-v1"}})
    with pytest.raises(MixedVersions) as err:
        report(exp, layout)
    assert f"titles-extract-v1 ({old}, titles-sft-lora-n1000-s0)" in str(err.value)
    assert f"titles-extract-v2 ({new})" in str(err.value) and "--allow-mixed" in str(err.value)
    assert not layout.report_dir.exists()  # refused before anything was written
    result = report(exp, layout, allow_mixed=True)
    assert "**Mixed versions (reported with --allow-mixed)" in result.markdown
    titles = {line.split(":")[0]: line for line in result.markdown.splitlines() if line.startswith("### titles")}
    assert titles["### titles · SFT · titles (task suite)"].endswith(" · MIXED VERSIONS")
    assert not titles["### titles · SFT · arc_easy (forgetting suite)"].endswith("MIXED VERSIONS")  # not mixed
    with (layout.report_dir / "results.csv").open() as f:
        versions = {(r["cell_id"], r["scorer_version"]) for r in csv.DictReader(f) if r["suite"] == "titles"}
    assert (old, "titles-extract-v1") in versions and (new, "titles-extract-v2") in versions
    with pytest.raises(MixedVersions):  # the rebuild applies the same rule
        report_from_items(layout.report_dir / "items.csv", tmp_path / "out")
    report_from_items(layout.report_dir / "items.csv", tmp_path / "out", allow_mixed=True)
    assert_same_tables(layout.report_dir, tmp_path / "out")


def test_different_prompt_versions_are_refused_by_the_command(run, no_plots, capsys):
    exp, layout = run
    set_result(layout, "math-sft-lora-n100-s0", prompt_versions={"gsm8k": "gsm8k-zeroshot-v1"})
    config = layout.root / "experiment-for-cli.yaml"
    import yaml

    from tests.test_report import FIXTURE
    data = yaml.safe_load(FIXTURE.read_text()) | {"output_dir": str(layout.root.parent)}
    config.write_text(yaml.safe_dump(data))
    assert main(["report", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert "suite gsm8k: prompt_version gsm8k-zeroshot-v1 (math-sft-lora-n100-s0); unrecorded (" in err
    assert main(["report", "-c", str(config), "--allow-mixed"]) == 0


def test_code_versions_are_listed_with_their_cells_not_refused(run, no_plots):
    exp, layout = run
    for cell_id in MATH:
        set_result(layout, cell_id, code={"version": "git:aaaaaaaaaaaa", "commit": "a" * 40, "dirty": False})
    set_result(layout, "math-dpo-lora-n1000-s0", code={"version": "git:bbbbbbbbbbbb+dirty"})
    result = report(exp, layout)
    assert "Code: 3 versions made these cells" in result.markdown
    assert "- git:bbbbbbbbbbbb+dirty: 1 cell: math-dpo-lora-n1000-s0" in result.markdown
    assert "- unrecorded: 3 cells: titles-none-d2lora-n0-s0, titles-none-lora-n0-s0, titles-sft-lora-n1000-s0" in \
        result.markdown


def test_n_trained_is_shown_beside_n(run, no_plots):
    exp, layout = run
    set_result(layout, "math-sft-d2lora-n100-s0", n_trained=97)
    set_result(layout, "math-sft-lora-n100-s0", n_trained=97)
    set_result(layout, "math-sft-lora-n1000-s0", n_trained=998)
    set_result(layout, "math-sft-d2lora-n1000-s0", n_trained=1000)
    set_result(layout, "math-sft-lora-n1000-s1", n_trained=996)
    result = report(exp, layout)
    assert table(result.markdown, "math · SFT · gsm8k")["n"] == ["0", "100 (97 trained)", "1000 (996–1000 trained)",
                                                                "2000"]
    with (layout.report_dir / "results.csv").open() as f:
        trained = {(r["cell_id"], r["n_trained"]) for r in csv.DictReader(f)}
    assert ("math-sft-d2lora-n100-s0", "97") in trained and ("math-none-lora-n0-s0", "0") in trained
    assert ("math-sft-d2lora-n100-s1", "") in trained  # not recorded
    with (layout.report_dir / "deltas.csv").open() as f:
        deltas = {(r["method"], r["n"], r["n_trained"]) for r in csv.DictReader(f)
                  if r["suite"] == "gsm8k" and r["metric"] == "accuracy"}
    # n = 100 pairs seed 0 (both 97) and seed 1 (not recorded); n = 1000 pairs seed 0 only (998, 1000)
    assert deltas >= {("none", "0", "0"), ("sft", "100", "97"), ("sft", "1000", "998–1000")}
