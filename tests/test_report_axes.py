"""The report of an experiment with the warm-up and LoRA-init axes, on hand-written cells: a row per
arm, Δ per warm-up against the vanilla arm of the same LoRA init, and Δ drawn against m."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from d2lora_dist.config import experiment_from_dict
from d2lora_dist.layout import RunLayout
from d2lora_dist.report import report
from d2lora_dist.report.collect import collect
from d2lora_dist.report.paired import Deltas, load_item_scores
from d2lora_dist.report.plots import INTERVAL, UNRESOLVED, delta_vs_m_panel
from d2lora_dist.report.tables import table_specs
from d2lora_dist.report.verdicts import primary_keys
from d2lora_dist.sweep.grid import plan_cells
from tests.test_report import prediction_rows

M = 40  # held-out items per cell
BASE = 0.30  # every vanilla arm's per-item ROUGE is BASE ± 0.05
# Δ of each warm-up over vanilla LoRA at n = 16: m192 adds a constant (resolved), m64 only noise (unresolved)
GAIN = {"m192": 0.04, "m64": 0.0}


def experiment(tmp_path: Path):
    warmup = {"dataset": {"name": "orpo_dpo_mix", "data_files": ["warm.jsonl"]}, "n": 64,
              "train": {"learning_rate": 1e-4, "epochs": 1, "global_batch_size": 8}}
    return experiment_from_dict({
        "name": "axes", "output_dir": str(tmp_path / "runs"),
        "model": {"name_or_path": "model-dir", "dtype": "float32"},
        "warmups": {"m64": warmup, "m192": {**warmup, "n": 192}},
        "tasks": {"titles": {"dataset": {"name": "econ_abstracts", "data_files": ["titles.jsonl"]}, "holdout": M,
                             "suites": ["titles"]}},
        "suites": {"titles": {"kind": "titles"}},
        "methods": {"sft": {"learning_rate": 1e-4, "epochs": 1, "global_batch_size": 4}},
        "grid": [{"task": "titles", "methods": ["sft"], "inits": ["lora", "d2lora"], "lora_inits": ["default", "pissa"],
                  "n": [0, 16], "seeds": [0, 1, 2]}],
        "report": {"min_seeds": 3, "primary": [{"task": "titles", "method": "sft", "n": 16, "metric": "rougeL",
                                                "warmup": "m192", "lora_init": "pissa"}]},
        "tracking": {"mode": "disabled"}}, "axes.yaml")


def item_scores(cell, seed_shift: int) -> list[float]:
    """Vanilla: BASE ± 0.05 by item parity. A warm-up adds GAIN plus ±0.03 noise that cancels over items."""
    scores = [BASE + (0.05 if i % 2 else -0.05) for i in range(M)]
    if cell.warmup and cell.n > 0:
        noise = [0.03 if (i + seed_shift) % 4 < 2 else -0.03 for i in range(M)]
        scores = [s + GAIN[cell.warmup] + e for s, e in zip(scores, noise, strict=True)]
    return scores


def write_titles_cell(exp, layout: RunLayout, cell, scores: list[float]) -> None:
    """A finished titles cell as the sweep leaves it: per-item predictions and a result.json with their means
    (the same scores for ROUGE-1, -2 and -L)."""
    rows = prediction_rows("titles", {k: scores for k in ("rouge1", "rouge2", "rougeL")})
    path = layout.cell_predictions(cell.id, "titles")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean, items = sum(scores) / len(scores), len(scores)
    layout.cell_result(cell.id).write_text(json.dumps({
        "cell": cell.to_dict(), "experiment": exp.name, "suites": {"titles": "task"},
        "metrics": {"titles": {"rouge1": mean, "rouge2": mean, "rougeL": mean, "items": items}}}))


def write_results(exp) -> RunLayout:
    layout = RunLayout(exp.run_dir)
    for cell in plan_cells(exp):
        write_titles_cell(exp, layout, cell, item_scores(cell, cell.seed))
    return layout


def table(markdown: str, title: str) -> dict[str, list[str]]:
    lines = markdown.split(f"### {title}", 1)[1].split("\n\n", 2)[1].splitlines()
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}


def test_cells_of_the_axes_have_readable_ids_and_n0_vanilla_is_planned_once(tmp_path):
    ids = [c.id for c in plan_cells(experiment(tmp_path))]
    assert len(ids) == 23 and len(set(ids)) == 23
    assert [i for i in ids if "-n0-" in i] == [
        "titles-none-d2lora@m192-n0-s0", "titles-none-d2lora@m64-n0-s0", "titles-none-lora-n0-s0",
        "titles-none-d2lora@m192+pissa-n0-s0", "titles-none-d2lora@m64+pissa-n0-s0"]
    assert "titles-sft-lora+pissa-n16-s2" in ids and "titles-sft-d2lora@m64+pissa-n16-s0" in ids


def test_tables_have_a_row_per_arm_and_a_delta_per_warmup_and_lora_init(tmp_path, capsys):
    exp = experiment(tmp_path)
    write_results(exp)
    result = report(exp, RunLayout(exp.run_dir))
    rows = table(result.markdown, "titles · SFT · titles (task suite)")
    assert {"ROUGE-L LoRA", "ROUGE-L D2LoRA(m64)", "ROUGE-L D2LoRA(m192)", "ROUGE-L LoRA · PiSSA",
            "ROUGE-L D2LoRA(m64) · PiSSA", "ROUGE-L D2LoRA(m192) · PiSSA"} <= set(rows)
    # n = 0 of LoRA · PiSSA is the one vanilla base cell (every init starts at the base's function)
    assert rows["ROUGE-L LoRA · PiSSA"][0] == rows["ROUGE-L LoRA"][0] == "30.00"
    resolved = rows["ROUGE-L Δ (D2LoRA(m192) · PiSSA − LoRA · PiSSA)"][1]
    assert resolved.startswith("**+4.00** [+3.") and "· 3 seeds × 40 items" in resolved, resolved
    assert resolved.endswith("· resolved (primary)"), resolved  # report.primary names warm-up and LoRA init
    unresolved = rows["ROUGE-L Δ (D2LoRA(m64) − LoRA)"][1]
    assert unresolved.startswith("+0.00 [") and "· unresolved (exploratory, Holm-adjusted p" in unresolved
    other = rows["ROUGE-L Δ (D2LoRA(m192) − LoRA)"][1]  # the same gain at the default init: exploratory
    assert other.startswith("**+4.00**") and "· resolved (exploratory, Holm-adjusted p 0.000 over" in other
    with (RunLayout(exp.run_dir).report_dir / "deltas.csv").open() as f:
        deltas = [r for r in csv.DictReader(f) if r["metric"] == "rougeL" and r["n"] == "16"]
    assert {(r["treatment"], r["baseline"]) for r in deltas} == {
        ("d2lora@m64", "lora"), ("d2lora@m192", "lora"), ("d2lora@m64+pissa", "lora+pissa"),
        ("d2lora@m192+pissa", "lora+pissa")}


def test_delta_against_m_draws_every_interval_in_order_of_m_and_labels_unresolved(tmp_path):
    exp = experiment(tmp_path)
    layout = write_results(exp)
    coll = collect(exp, layout)
    deltas = Deltas(coll, load_item_scores(exp, layout, coll), exp.report.min_seeds, primary_keys(exp))
    spec = next(s for s in table_specs(exp, coll) if s.method == "sft")
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    sizes = {"m64": 64, "m192": 192}
    assert delta_vs_m_panel(ax, deltas, spec, 16, ["m64", "m192"], sizes) == 2  # one series per LoRA init
    assert [t.get_text() for t in ax.get_xticklabels()] == ["64\n(m64)", "192\n(m192)"]
    intervals = [c for c in ax.collections if c.get_gid() == INTERVAL]
    assert len(intervals) == 4  # 2 warm-ups x 2 LoRA inits, each with its interval
    spans = sorted((s[0][0], s[0][1], s[1][1]) for c in intervals for s in c.get_segments())
    assert [x < 0.5 for x, _, _ in spans] == [True, True, False, False]  # m64 at position 0, m192 at 1
    assert all(lo < 0 < hi for x, lo, hi in spans if x < 0.5)  # m64: the interval spans 0
    assert all(3 < lo < 4 < hi < 5 for x, lo, hi in spans if x > 0.5)  # m192: +4 pp, resolved
    labels = [t for t in ax.texts if t.get_gid() == UNRESOLVED]
    assert len(labels) == 2 and all(t.get_text() == "unresolved (Holm)" for t in labels)  # m64, both inits
    # m192 at the default init is resolved only after Holm: it says so; the primary (PiSSA) says nothing
    assert [t.get_text() for t in ax.texts if t.get_gid() is None] == ["resolved (Holm)"]
    assert all(abs(t.xy[0] - round(t.xy[0])) < 0.2 and round(t.xy[0]) == 0 for t in labels)  # at m = 64


def test_report_writes_the_delta_vs_m_figure(tmp_path):
    exp = experiment(tmp_path)
    write_results(exp)
    written = {p.name for p in report(exp, RunLayout(exp.run_dir)).plots}
    assert {"titles_sft_vs_n.png", "titles_delta_vs_n.png", "titles_sft_delta_vs_m.png"} <= written


def test_report_plots_a_grid_of_vanilla_arms_under_two_lora_inits(tmp_path):
    """LoRA and LoRA · PiSSA without any D2LoRA arm: two arms, styled by their init (lora), not by name."""
    exp = experiment(tmp_path)
    exp = experiment_from_dict({**exp.to_dict(), "grid": [{**exp.to_dict()["grid"][0], "inits": ["lora"]}],
                                "report": {"min_seeds": 3}}, "axes.yaml")
    write_results(exp)
    written = {p.name for p in report(exp, RunLayout(exp.run_dir)).plots}
    assert "titles_sft_vs_n.png" in written and "titles_low_data.png" in written


@pytest.mark.parametrize("grid,fragment", [
    ({"lora_inits": ["svd"]}, "grid[0].lora_inits: unknown LoRA init 'svd'"),
    ({"warmups": ["m999"]}, "grid[0].warmups: unknown warm-up 'm999' (defined: ['m192', 'm64'])"),
    ({"lora_inits": []}, "grid[0].lora_inits: empty"),
])
def test_bad_axes_are_named(tmp_path, grid, fragment):
    from d2lora_dist.schema import ConfigError

    exp = experiment(tmp_path).to_dict()
    exp["grid"][0] |= grid
    with pytest.raises(ConfigError) as err:
        experiment_from_dict(exp, "axes.yaml")
    assert any(fragment in p for p in err.value.problems), err.value.problems


def test_wandb_report_has_a_runset_per_arm(tmp_path):
    from d2lora_dist.report.wandb_report import plan_report

    exp = experiment(tmp_path)
    write_results(exp)
    coll = collect(exp, RunLayout(exp.run_dir))
    plan = plan_report(exp, table_specs(exp, coll), "", [], 23, 23)
    runsets = {r.name: r.filters for r in plan.sections[0].runsets}
    assert list(runsets) == ["LoRA", "D2LoRA(m64)", "D2LoRA(m192)", "LoRA · PiSSA", "D2LoRA(m64) · PiSSA",
                             "D2LoRA(m192) · PiSSA"]
    assert runsets["D2LoRA(m64) · PiSSA"].endswith("Config('cell.arm') == 'd2lora@m64+pissa'")
