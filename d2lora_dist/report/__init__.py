"""Report of one experiment: collect results -> paired Δ -> tables (csv, markdown) -> plots -> W&B report.

Reads `cells/<cell-id>/result.json` against the plan and each finished cell's
`predictions/<suite>.jsonl` (per-item scores for the paired statistics), and writes into
`report/` only the files it owns (results.csv, deltas.csv, results.md, plots/*.png), each
atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from d2lora_dist.config import Experiment
from d2lora_dist.fileio import write_text_atomic as atomic_write_text
from d2lora_dist.layout import RunLayout
from d2lora_dist.report.collect import collect
from d2lora_dist.report.paired import Deltas, load_item_scores, render_deltas_csv
from d2lora_dist.report.plots import write_plots
from d2lora_dist.report.tables import render_csv, render_markdown, table_specs
from d2lora_dist.report.verdicts import primary_keys

__all__ = ["ReportResult", "report"]


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

    @property
    def paths(self) -> list[Path]:
        return [self.csv_path, self.deltas_path, self.markdown_path, *self.plots]


def report(exp: Experiment, layout: RunLayout, wandb_report: bool = False) -> ReportResult:
    """Write results.csv, deltas.csv, results.md and the plots; print the tables and paths."""
    coll = collect(exp, layout)
    specs = table_specs(exp, coll)
    deltas = Deltas(coll, load_item_scores(exp, layout, coll), exp.report.min_seeds, primary_keys(exp))
    every = deltas.every([(s.task, s.method, s.suite, s.ns) for s in specs])
    markdown = render_markdown(exp, coll, specs, deltas)
    out = layout.report_dir
    csv_path = atomic_write_text(out / "results.csv", render_csv(coll.rows))
    deltas_path = atomic_write_text(out / "deltas.csv", render_deltas_csv(every))
    md_path = atomic_write_text(out / "results.md", markdown)
    plots = write_plots(coll, specs, deltas, out / "plots", {name: w.n for name, w in exp.warmup_configs().items()},
                        _warmup_labels(exp, layout))
    result = ReportResult(len(coll.planned), len(coll.done), coll.missing, coll.unplanned, csv_path, deltas_path,
                          md_path, markdown, plots)
    print(markdown)
    print("Wrote:", *[f"  {p}" for p in result.paths], sep="\n")
    if wandb_report:
        from d2lora_dist.report.wandb_report import plan_report
        from d2lora_dist.report.wandb_report import wandb_report as publish

        plan = plan_report(exp, specs, markdown, plots, result.done, result.planned)
        result.wandb = publish(exp, layout, plan)
        print(*result.wandb, sep="\n")
    return result


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
