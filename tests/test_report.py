"""Report: tables, statistics, plots and the W&B report plan, on hand-written result.json files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.report import report
from d2lora_dist.report.collect import collect
from d2lora_dist.report.stats import BOOTSTRAP_SEED, RESAMPLES, bootstrap_diff_ci, mean_std
from d2lora_dist.report.tables import table_specs
from d2lora_dist.report.wandb_report import build, plan_report

FIXTURE = Path(__file__).parent / "fixtures" / "report" / "experiment.yaml"
PLANNED = 42  # cells in the fixture's plan

# (cell id) -> {suite: {metric: value}}; fractions, as the cells write them.
MATH = {
    "math-none-lora-n0-s0": (0.20, 0.60),
    "math-none-d2lora-n0-s0": (0.22, 0.61),
    "math-sft-lora-n100-s0": (0.21, 0.58),
    "math-sft-lora-n100-s1": (0.23, 0.60),
    "math-sft-d2lora-n100-s0": (0.24, 0.61),
    "math-sft-d2lora-n100-s1": (0.28, 0.59),
    "math-sft-lora-n1000-s0": (0.24, 0.57),
    "math-sft-lora-n1000-s1": (0.26, 0.59),
    "math-sft-d2lora-n1000-s0": (0.27, 0.60),
    "math-dpo-lora-n1000-s0": (0.30, 0.62),
}
TITLES = {
    "titles-none-lora-n0-s0": (0.30, 0.12, 0.28, 0.60),
    "titles-none-d2lora-n0-s0": (0.33, 0.14, 0.31, 0.61),
    "titles-sft-lora-n1000-s0": (0.41, 0.20, 0.37, 0.58),
}


def load_experiment(tmp_path: Path):
    data = yaml.safe_load(FIXTURE.read_text())
    data["output_dir"] = str(tmp_path / "runs")
    return experiment_from_dict(data, str(FIXTURE))


def cell_dict(cell_id: str) -> dict:
    task, method, init, n, seed = cell_id.split("-")
    return {"id": cell_id, "task": task, "method": method, "init": init, "n": int(n[1:]), "seed": int(seed[1:])}


def write_result(layout: RunLayout, cell_id: str, metrics: dict, suites: dict) -> None:
    cell = cell_dict(cell_id)
    trains = cell["n"] > 0
    result = {"cell": cell, "experiment": "report_fixture", "metrics": metrics, "suites": suites,
              "train": {"steps": 12, "first_loss": 0.69, "final_loss": 0.61, "runtime_s": 30.2} if trains else None,
              "adapter": {"sha256": "a" * 64, "parent_sha256": None} if trains else None,
              "finished_at": "2026-11-22T05:00:00Z"}
    path = layout.cell_result(cell_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))


@pytest.fixture
def run(tmp_path):
    exp = load_experiment(tmp_path)
    layout = RunLayout(exp.run_dir)
    for cell_id, (gsm, arc) in MATH.items():
        write_result(layout, cell_id,
                     {"gsm8k": {"accuracy": gsm, "items": 50},
                      "arc_easy": {"accuracy": arc, "accuracy_norm": arc + 0.01, "items": 50}},
                     {"gsm8k": "task", "arc_easy": "forgetting"})
    for cell_id, (r1, r2, rl, arc) in TITLES.items():
        write_result(layout, cell_id,
                     {"titles": {"rouge1": r1, "rouge2": r2, "rougeL": rl, "items": 100},
                      "arc_easy": {"accuracy": arc, "accuracy_norm": arc, "items": 50}},
                     {"titles": "task", "arc_easy": "forgetting"})
    # A cell still running: its directory exists but result.json does not.
    layout.cell_subset("math-sft-d2lora-n1000-s1").parent.mkdir(parents=True)
    layout.cell_subset("math-sft-d2lora-n1000-s1").write_text("[]")
    return exp, layout


def table(markdown: str, heading: str) -> dict[str, list[str]]:
    """Rows of the markdown table under `### heading...`: label -> cells (the n header under 'n')."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"### {heading}"))
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells[1:]
    return rows


def expected_ci(d2lora: list[float], lora: list[float]) -> tuple[float, float]:
    """The documented bootstrap, recomputed here with numpy."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    a, b = np.array(d2lora), np.array(lora)
    diffs = (a[rng.integers(0, a.size, (RESAMPLES, a.size))].mean(1)
             - b[rng.integers(0, b.size, (RESAMPLES, b.size))].mean(1))
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return lo * 100, hi * 100


def test_tables_show_mean_std_delta_ci_and_missing(run, capsys):
    exp, layout = run
    result = report(exp, layout)
    md = layout.report_dir.joinpath("results.md").read_text()
    assert md == result.markdown
    assert f"**13 of {PLANNED} planned cells done** (29 missing)" in md
    assert result.planned == PLANNED and result.done == 13 and len(result.missing) == 29
    assert "math-sft-d2lora-n1000-s1" in result.missing  # running, no result.json yet

    sft = table(md, "math · SFT · gsm8k (task suite)")
    assert sft["n"] == ["0", "100", "1000", "2000"]
    assert sft["LoRA"] == ["20.00", "22.00 ± 1.41", "25.00 ± 1.41", "—"]
    assert sft["D2LoRA"] == ["22.00", "26.00 ± 2.83", "27.00", "—"]
    lo, hi = expected_ci([0.24, 0.28], [0.21, 0.23])
    delta = sft["Δ (D2LoRA − LoRA)"]
    assert delta[0] == "+2.00 (1 seed, no CI)"
    assert delta[1] == f"+4.00 [{lo:+.2f}, {hi:+.2f}]"
    assert delta[2] == "+2.00 (1 seed, no CI)"
    assert delta[3] == "—"
    assert sft["seeds done (LoRA · D2LoRA)"] == ["1/1 · 1/1", "2/2 · 2/2", "2/2 · 1/2", "0/2 · 0/2"]

    forgetting = table(md, "math · SFT · arc_easy (forgetting suite)")
    assert forgetting["LoRA"] == ["60.00", "59.00 ± 1.41", "58.00 ± 1.41", "—"]
    # n = 0 cells (method none) are in every method's table; ORPO has nothing else yet.
    orpo = table(md, "math · ORPO · gsm8k (task suite)")
    assert orpo["LoRA"] == ["20.00", "—", "—", "—"]
    assert orpo["Δ (D2LoRA − LoRA)"] == ["+2.00 (1 seed, no CI)", "—", "—", "—"]
    dpo = table(md, "math · DPO · gsm8k (task suite)")
    assert dpo["LoRA"][2] == "30.00" and dpo["D2LoRA"][2] == "—" and dpo["Δ (D2LoRA − LoRA)"][2] == "—"

    titles = table(md, "titles · SFT · titles (task suite)")
    assert titles["n"] == ["0", "1000"]
    assert titles["ROUGE-L LoRA"] == ["28.00", "37.00"]
    assert titles["ROUGE-1 LoRA"] == ["30.00", "41.00"]
    assert titles["ROUGE-2 D2LoRA"] == ["14.00", "—"]
    assert titles["ROUGE-L Δ (D2LoRA − LoRA)"] == ["+3.00 (1 seed, no CI)", "—"]
    # Paper order: per task, methods sft/dpo/orpo, task suite before forgetting suite.
    headings = [line for line in md.splitlines() if line.startswith("### math")]
    assert [h.split(":")[0] for h in headings[:2]] == ["### math · SFT · gsm8k (task suite)",
                                                      "### math · SFT · arc_easy (forgetting suite)"]
    assert "0.00" not in " ".join(dpo["D2LoRA"])  # missing is never shown as 0
    out = capsys.readouterr().out
    assert "math · SFT · gsm8k" in out and "results.csv" in out and "math_sft_vs_n.png" in out


def test_csv_has_one_row_per_cell_and_metric(run):
    exp, layout = run
    report(exp, layout)
    with layout.report_dir.joinpath("results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(MATH) * 3 + len(TITLES) * 5  # items counts are not metrics
    assert list(rows[0]) == ["cell_id", "task", "method", "init", "n", "seed", "suite", "role", "metric", "value"]
    row = next(r for r in rows if r["cell_id"] == "math-sft-d2lora-n100-s1" and r["metric"] == "accuracy"
               and r["suite"] == "gsm8k")
    assert (row["task"], row["method"], row["init"], row["n"], row["seed"], row["role"], float(row["value"])) == (
        "math", "sft", "d2lora", "100", "1", "task", 0.28)
    assert {r["role"] for r in rows if r["suite"] == "arc_easy"} == {"forgetting"}


def test_plots_are_png_of_expected_size_and_not_blank(run):
    exp, layout = run
    result = report(exp, layout)
    names = sorted(p.name for p in result.plots)
    assert names == sorted(["math_sft_vs_n.png", "math_dpo_vs_n.png", "math_orpo_vs_n.png",
                            "math_methods_lora.png", "math_forgetting.png", "math_low_data.png",
                            "titles_sft_vs_n.png", "titles_methods_lora.png", "titles_forgetting.png"])
    for path in result.plots:
        assert path.parent == layout.report_dir / "plots"
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.size == (640, 400), path.name
            pixels = np.asarray(img.convert("RGB"))
        assert pixels.std() > 0
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 2


def test_writes_are_atomic_and_leave_other_files(run):
    exp, layout = run
    layout.report_dir.mkdir(parents=True)
    keep = layout.report_dir / "notes.txt"
    keep.write_text("mine")
    first = report(exp, layout)
    second = report(exp, layout)
    assert keep.read_text() == "mine"
    assert first.markdown == second.markdown  # the bootstrap is seeded
    leftovers = [p for p in layout.report_dir.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def test_unplanned_results_are_reported_and_bad_values_stop(run):
    exp, layout = run
    write_result(layout, "math-sft-lora-n500-s0", {"gsm8k": {"accuracy": 0.5}}, {"gsm8k": "task"})
    result = report(exp, layout)
    assert result.unplanned == ["math-sft-lora-n500-s0"]
    assert "1 finished cells are not in the current plan" in result.markdown
    assert table(result.markdown, "math · SFT · gsm8k")["n"] == ["0", "100", "500", "1000", "2000"]

    write_result(layout, "math-sft-lora-n2000-s0", {"gsm8k": {"accuracy": 25.0}}, {"gsm8k": "task"})
    with pytest.raises(ValueError, match=r"metrics\.gsm8k\.accuracy = 25\.0"):
        report(exp, layout)


def test_no_results_yet(tmp_path):
    exp = load_experiment(tmp_path)
    result = report(exp, RunLayout(exp.run_dir))
    assert result.done == 0 and result.plots == []
    assert f"**0 of {PLANNED} planned cells done**" in result.markdown
    assert table(result.markdown, "math · SFT · gsm8k")["LoRA"] == ["—"] * 4


def test_stats():
    assert mean_std([0.24, 0.26]) == pytest.approx((0.25, 0.0141421356))
    assert mean_std([0.3]) == (0.3, None)
    assert bootstrap_diff_ci([0.3], [0.2, 0.25]) is None
    ci = bootstrap_diff_ci([0.24, 0.28, 0.25], [0.21, 0.23])
    lo, hi = expected_ci([0.24, 0.28, 0.25], [0.21, 0.23])
    assert ci == pytest.approx((lo / 100, hi / 100))
    assert ci[0] <= 0.2567 - 0.22 <= ci[1]


def test_wandb_report_offline_says_what_and_how(run, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    exp, layout = run
    result = report(exp, layout, wandb_report=True)
    text = "\n".join(result.wandb)
    assert "W&B is offline: nothing published" in text
    assert "'D2LoRA: report_fixture'" in text
    assert "math · SFT · gsm8k (task suite)" in text  # a table
    assert "scatter panel 'gsm8k accuracy vs n': eval/gsm8k/accuracy vs cell.n" in text
    assert "line panel 'training loss': train/loss vs train/global_step" in text
    assert f"wandb sync {layout.wandb_dir}/offline-run-*" in text
    assert f"d2lora report -c {layout.experiment_file} --wandb-report" in text


def test_wandb_report_builds_with_wandb_workspaces(run):
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    exp, layout = run
    coll = collect(exp, layout)
    specs = table_specs(exp, coll)
    plan = plan_report(exp, specs, "# tables", [], len(coll.done), len(coll.planned))
    plan.entity = "someone"
    built = build(plan, wr)
    assert built.title == "D2LoRA: report_fixture"
    grids = [b for b in built.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 4  # math sft/dpo/orpo, titles sft
    assert [r.name for r in grids[0].runsets] == ["LoRA", "D2LoRA"]
    expr = pytest.importorskip("wandb_workspaces.expr")
    parsed = expr.expr_to_filters(plan.sections[0].runsets[0].filters)  # what save() sends
    assert [(f.key.name, f.op, f.value) for f in parsed.filters] == [
        ("group", "=", "report_fixture"), ("cell.task", "=", "math"), ("cell.method", "IN", ["sft", "none"]),
        ("cell.init", "=", "lora")]
    panels = grids[0].panels
    assert isinstance(panels[0], wr.ScatterPlot) and panels[0].y == wr.SummaryMetric("eval/gsm8k/accuracy")
    assert isinstance(panels[-1], wr.LinePlot) and panels[-1].y == ["train/tokens_per_s"]
