"""Report of one experiment: collect results -> paired Δ -> tables (csv, markdown) -> plots -> W&B report.

Reads `cells/<cell-id>/result.json` against the plan and each finished cell's
`predictions/<suite>.jsonl` (per-item scores for the paired statistics), and writes into
`report/` only the files it owns (results.csv, deltas.csv, results.md, items.csv, plots/*.png),
each atomically. Cells made by different prompt or scorer versions are refused unless
`allow_mixed` (report.versions). `report_from_items` rebuilds the same tables from an items.csv
alone (report.items).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2lora_dist.config import Experiment
from d2lora_dist.fileio import write_text_atomic as atomic_write_text
from d2lora_dist.layout import RunLayout
from d2lora_dist.report.collect import Collection, collect
from d2lora_dist.report.items import read_items_csv, render_items_csv
from d2lora_dist.report.paired import Deltas, ItemScores, load_item_scores, render_deltas_csv
from d2lora_dist.report.plots import write_plots
from d2lora_dist.report.tables import render_csv, render_markdown, table_specs
from d2lora_dist.report.tuning import tuning_section
from d2lora_dist.report.verdicts import Judging, judging_of
from d2lora_dist.report.versions import check_versions, version_lines
from d2lora_dist.sweep.grid import plan_cells

__all__ = ["ReportResult", "report", "report_from_items"]


@dataclass
class ReportResult:
    planned: int
    done: int
    missing: list[str]
    unplanned: list[str]
    csv_path: Path
    deltas_path: Path
    markdown_path: Path
    markdown: str
    plots: list[Path]
    wandb: list[str] = field(default_factory=list)
    items_path: Path | None = None  # written by a report on a run directory

    @property
    def paths(self) -> list[Path]:
        return [self.csv_path, self.deltas_path, self.markdown_path, *([self.items_path] if self.items_path else []),
                *self.plots]


def report(exp: Experiment, layout: RunLayout, wandb_report: bool = False, allow_mixed: bool = False) -> ReportResult:
    """Write results.csv, deltas.csv, results.md, items.csv and the plots; print the tables and paths."""
    coll = collect(exp, layout)
    conflicts = check_versions(coll.rows, allow_mixed)  # before anything is written
    scores = load_item_scores(exp, layout, coll)
    kinds = {name: suite.kind for name, suite in exp.suites.items()}
    judging = judging_of(exp)
    items = render_items_csv(exp.name, kinds, list(exp.tasks), coll, scores, judging)
    tuned, tuning_plots = tuning_section(exp, layout, plan_cells(exp), layout.report_dir / "plots")
    result, specs = _write(exp, judging, coll, scores, conflicts, layout.report_dir,
                           {name: w.n for name, w in exp.warmup_configs().items()}, _warmup_labels(exp, layout),
                           tuned)
    result.plots += tuning_plots
    result.items_path = atomic_write_text(layout.report_dir / "items.csv", items)
    _announce(result)
    if wandb_report:
        from d2lora_dist.report.wandb_report import plan_report
        from d2lora_dist.report.wandb_report import wandb_report as publish

        plan = plan_report(exp, specs, result.markdown, result.plots, result.done, result.planned)
        result.wandb = publish(exp, layout, plan)
        print(*result.wandb, sep="\n")
    return result


def report_from_items(items_csv: Path, out_dir: Path, allow_mixed: bool = False) -> ReportResult:
    """The report's tables and plots rebuilt from an items.csv alone, into out_dir (no run directory,
    experiment file or model). The Δ-against-m plots need the warm-ups' sizes and are not drawn."""
    study = read_items_csv(items_csv)
    conflicts = check_versions(study.coll.rows, allow_mixed)
    result, _ = _write(study.view, study.view.report, study.coll, study.scores, conflicts, Path(out_dir), {}, {})
    _announce(result)
    return result


def _write(exp: Any, judging: Judging, coll: Collection, scores: ItemScores, conflicts: dict[str, list[str]],
           out: Path, warmup_sizes: dict[str, int | None], warmup_labels: dict[str, str],
           appendix: list[str] | None = None) -> tuple[ReportResult, list]:
    """The tables and plots of these cells into `out`; `exp` is an Experiment or an items.csv's StudyView,
    `judging` how their Δs are judged (report.min_seeds, the primary comparisons, report.target_effect);
    `appendix`: markdown lines after the tables (the tuned settings)."""
    specs = table_specs(exp, coll)
    deltas = Deltas(coll, scores, judging.min_seeds, judging.primary)
    every = deltas.every([(s.task, s.method, s.suite, s.ns) for s in specs])
    markdown = render_markdown(exp, coll, specs, deltas, version_lines(coll.rows, conflicts), frozenset(conflicts))
    if appendix:
        markdown = markdown.rstrip("\n") + "\n\n" + "\n".join(appendix)
    csv_path = atomic_write_text(out / "results.csv", render_csv(coll.rows))
    deltas_path = atomic_write_text(out / "deltas.csv", render_deltas_csv(every, coll))
    md_path = atomic_write_text(out / "results.md", markdown)
    plots = write_plots(coll, specs, deltas, out / "plots", warmup_sizes, warmup_labels)
    return ReportResult(len(coll.planned), len(coll.done), coll.missing, coll.unplanned, csv_path, deltas_path,
                        md_path, markdown, plots), specs


def _announce(result: ReportResult) -> None:
    print(result.markdown)
    print("Wrote:", *[f"  {p}" for p in result.paths], sep="\n")


def _warmup_labels(exp: Experiment, layout: RunLayout) -> dict[str, str]:
    """How Δ against m names each warm-up: its m, name and, once trained, the rows it trained on
    (max_length drops rows whose prompt fills it, so m counts the rows drawn)."""
    from d2lora_dist.fileio import read_json

    labels = {}
    for name, cfg in exp.warmup_configs().items():
        label = f"{cfg.n}\n({name}"
        path = layout.warmup_result_of(name)
        cut = (read_json(path).get("train") or {}).get("truncation") if path.is_file() else None
        if cut:
            label += f", {cut['rows'] - cut['prompt_fills']} trained"
        labels[name] = label + ")"
    return labels
