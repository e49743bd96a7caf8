"""The W&B Report: the markdown tables plus, per task and method, panels over the cells' runs.

The plan is plain data, so offline it can be printed (what would be published and how to
publish later) and tests can check it; online it is built with `wandb-workspaces` (the
optional `wandb-report` extra, imported only here) and saved.

Panels read what the cells log: config `cell.task|method|init|arm|n` (tracking.start_run), the
eval runs' summary `eval/<suite>/<metric>` (`tracking.finish_run(run, {"eval": metrics})`)
and the adapt runs' `train/*` history (the trainer's WandbCallback).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from d2lora_dist.config import Experiment
from d2lora_dist.layout import RunLayout
from d2lora_dist.methods import method_label
from d2lora_dist.report.arms import Arm, ordered_arms
from d2lora_dist.report.tables import INITS, TableSpec
from d2lora_dist.sweep.grid import NO_TRAINING, plan_cells
from d2lora_dist.tracking import link_inputs, project_and_entity, resolve_mode

EVAL_PREFIX = "eval"  # summary key prefix of the evaluation runs


@dataclass(frozen=True)
class PanelSpec:
    kind: str  # "scatter" (summary vs config) | "line" (history vs step)
    title: str
    x: str
    y: str


@dataclass(frozen=True)
class RunsetSpec:
    name: str
    filters: str


@dataclass
class SectionSpec:
    heading: str
    runsets: list[RunsetSpec]
    panels: list[PanelSpec]


@dataclass
class ReportPlan:
    project: str
    entity: str | None
    title: str
    description: str
    tables_markdown: str
    table_titles: list[str]
    sections: list[SectionSpec] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


def plan_report(exp: Experiment, specs: list[TableSpec], markdown: str, plots: list[Path],
                done: int, planned: int) -> ReportPlan:
    project, entity = project_and_entity(exp.tracking)
    plan = ReportPlan(project, entity, f"D2LoRA: {exp.name}"[:128],
                      f"{done} of {planned} planned cells done. Group {exp.name!r}.", markdown,
                      [s.title for s in specs], plots=list(plots))
    for task, method in dict.fromkeys((s.task, s.method) for s in specs if s.method != NO_TRAINING):
        methods = f"['{method}', '{NO_TRAINING}']"
        arms = ordered_arms({c.arm for c in plan_cells(exp) if c.task == task})
        # without the axes an arm is its init (runs logged before `cell.arm` existed have only that)
        key, rows = ("init", INITS) if set(arms) <= {i for i, _ in INITS} else \
            ("arm", [(a, Arm.parse(a).label) for a in arms])
        runsets = [RunsetSpec(label, f"Metric('Group') == '{exp.name}' and Config('cell.task') == '{task}' "
                                     f"and Config('cell.method') in {methods} and Config('cell.{key}') == '{arm}'")
                   for arm, label in rows]
        panels = [PanelSpec("scatter", f"{s.suite} {s.metrics[0][1]} vs n", "cell.n",
                            f"{EVAL_PREFIX}/{s.suite}/{s.metrics[0][0]}")
                  for s in specs if (s.task, s.method) == (task, method)]
        panels += [PanelSpec("line", "training loss", "train/global_step", "train/loss"),
                   PanelSpec("line", "tokens per second", "train/global_step", "train/tokens_per_s")]
        plan.sections.append(SectionSpec(f"{task} · {method_label(method)}", runsets, panels))
    return plan


def describe(plan: ReportPlan) -> list[str]:
    lines = [f"W&B report {plan.title!r} in {plan.entity or '<default entity>'}/{plan.project}",
             f"  {plan.description}", f"  tables ({len(plan.table_titles)}, from results.md):"]
    lines += [f"    - {t}" for t in plan.table_titles]
    for section in plan.sections:
        lines.append(f"  section {section.heading}: runsets {', '.join(r.name for r in section.runsets)}")
        lines += [f"    - {p.kind} panel {p.title!r}: {p.y} vs {p.x}" for p in section.panels]
    return lines


def wandb_report(exp: Experiment, layout: RunLayout, plan: ReportPlan) -> list[str]:
    """Publish when online; otherwise say what would be published and how. Returns the lines."""
    mode = resolve_mode(exp.tracking)
    if mode != "online":
        return [f"W&B is {mode}: nothing published. It would publish:", *describe(plan),
                "To publish later, with credentials (WANDB_API_KEY or `wandb login`):",
                f"  wandb sync {layout.wandb_dir}/offline-run-*",
                f"  d2lora report -c {layout.experiment_file} --wandb-report",
                "  (needs the extra: pip install 'd2lora-dist[wandb-report]')"]
    linked = link_inputs(exp)  # offline cells recorded their input adapter; declare it now
    url = publish(plan)
    return [f"W&B report published: {url}", *[f"  lineage: {line}" for line in linked]]


def publish(plan: ReportPlan) -> str:
    try:
        import wandb_workspaces.reports.v2 as wr
    except ImportError as e:
        raise RuntimeError("--wandb-report needs wandb-workspaces: pip install 'd2lora-dist[wandb-report]'") from e
    report = build(plan, wr)
    report.save()
    return str(report.url)


def build(plan: ReportPlan, wr) -> object:
    """The wandb-workspaces Report object for the plan (not saved)."""
    blocks: list = [wr.H1(text="Results"), wr.MarkdownBlock(text=plan.tables_markdown)]
    for section in plan.sections:
        runsets = [wr.Runset(entity=plan.entity or "", project=plan.project, name=r.name, filters=r.filters)
                   for r in section.runsets]
        panels = [wr.ScatterPlot(title=p.title, x=wr.Config(p.x), y=wr.SummaryMetric(p.y))
                  if p.kind == "scatter" else wr.LinePlot(title=p.title, x=p.x, y=[p.y])
                  for p in section.panels]
        blocks += [wr.H2(text=section.heading), wr.PanelGrid(runsets=runsets, panels=panels)]
    kwargs = {"entity": plan.entity} if plan.entity else {}
    return wr.Report(project=plan.project, title=plan.title, description=plan.description, blocks=blocks,
                     **kwargs)
