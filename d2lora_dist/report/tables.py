"""Paper-style tables: per task and method, per suite (task suite, then forgetting), n as columns.

Rows are LoRA, D2LoRA and Δ (D2LoRA − LoRA); values are percentages, mean ± std over seeds;
Δ carries a bootstrap 95% CI over seeds; "—" marks a cell that has not finished (never 0).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from d2lora_dist.config import Experiment
from d2lora_dist.report.collect import Collection, Row
from d2lora_dist.report.stats import BOOTSTRAP_SEED, LEVEL, RESAMPLES, bootstrap_diff_ci, mean_std
from d2lora_dist.sweep.grid import NO_TRAINING

MISSING = "—"
METHOD_ORDER = ("sft", "dpo", "orpo")
INITS = (("lora", "LoRA"), ("d2lora", "D2LoRA"))
METHOD_LABELS = {"sft": "SFT", "dpo": "DPO", "orpo": "ORPO", NO_TRAINING: "no training"}
# Metrics shown per suite kind, the primary (plotted) one first.
SUITE_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "gsm8k": (("accuracy", "accuracy"),),
    "arc": (("accuracy", "accuracy"),),
    "titles": (("rougeL", "ROUGE-L"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2")),
}


@dataclass(frozen=True)
class TableSpec:
    task: str
    method: str
    suite: str
    role: str
    ns: tuple[int, ...]
    metrics: tuple[tuple[str, str], ...]  # (key in result.json, label)

    @property
    def title(self) -> str:
        return f"{self.task} · {METHOD_LABELS.get(self.method, self.method)} · {self.suite} ({self.role} suite)"


# ---- what to show ---------------------------------------------------------------------

def table_specs(exp: Experiment, coll: Collection) -> list[TableSpec]:
    """Every table of the report, in the paper's order."""
    specs = []
    for task in _tasks(exp, coll):
        for method in _methods(coll, task):
            ns = tuple(sorted({c.n for c in coll.cells() if c.task == task
                               and (c.method == method or c.method == NO_TRAINING)}))
            for suite, role in _suites(exp, coll, task):
                specs.append(TableSpec(task, method, suite, role, ns, suite_metrics(exp, coll, suite)))
    return specs


def suite_metrics(exp: Experiment, coll: Collection, suite: str) -> tuple[tuple[str, str], ...]:
    if suite in exp.suites:
        return SUITE_METRICS[exp.suites[suite].kind]
    return tuple((m, m) for m in sorted({r.metric for r in coll.rows if r.suite == suite}))


def _tasks(exp: Experiment, coll: Collection) -> list[str]:
    seen = {c.task for c in coll.cells()}
    return [t for t in exp.tasks if t in seen] + sorted(seen - set(exp.tasks))


def _methods(coll: Collection, task: str) -> list[str]:
    methods = {c.method for c in coll.cells() if c.task == task} - {NO_TRAINING}
    if not methods:
        return [NO_TRAINING]
    return [m for m in METHOD_ORDER if m in methods] + sorted(methods - set(METHOD_ORDER))


def _suites(exp: Experiment, coll: Collection, task: str) -> list[tuple[str, str]]:
    configured = list(exp.tasks[task].suites) if task in exp.tasks else []
    roles = {s: ("task" if i == 0 else "forgetting") for i, s in enumerate(configured)}
    for r in coll.rows:
        if r.task == task:
            roles.setdefault(r.suite, r.role)
    ordered = sorted(roles, key=lambda s: (roles[s] != "task", s not in configured,
                                           configured.index(s) if s in configured else 0, s))
    return [(s, roles[s]) for s in ordered]


# ---- formatting -----------------------------------------------------------------------

def fmt_mean_std(values: list[float]) -> str:
    if not values:
        return MISSING
    mean, std = mean_std(values)
    return f"{mean * 100:.2f}" if std is None else f"{mean * 100:.2f} ± {std * 100:.2f}"


def fmt_delta(d2lora: list[float], lora: list[float]) -> str:
    if not d2lora or not lora:
        return MISSING
    delta = (mean_std(d2lora)[0] - mean_std(lora)[0]) * 100
    ci = bootstrap_diff_ci(d2lora, lora)
    if ci is None:
        return f"{delta:+.2f} (1 seed, no CI)"
    return f"{delta:+.2f} [{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]"


def render_table(spec: TableSpec, coll: Collection) -> str:
    lines = ["| n | " + " | ".join(str(n) for n in spec.ns) + " |",
             "|---|" + "---:|" * len(spec.ns)]
    for key, label in spec.metrics:
        prefix = f"{label} " if len(spec.metrics) > 1 else ""
        vals = {init: [coll.values(spec.task, spec.method, init, n, spec.suite, key) for n in spec.ns]
                for init, _ in INITS}
        for init, init_label in INITS:
            lines.append(_row(f"{prefix}{init_label}", [fmt_mean_std(v) for v in vals[init]]))
        deltas = [fmt_delta(d, lo) for d, lo in zip(vals["d2lora"], vals["lora"], strict=True)]
        lines.append(_row(f"{prefix}Δ (D2LoRA − LoRA)", deltas))
    seeds = []
    for n in spec.ns:
        counts = [coll.seeds(spec.task, spec.method, init, n) for init, _ in INITS]
        seeds.append(" · ".join(f"{done}/{planned}" for done, planned in counts))
    lines.append(_row("seeds done (LoRA · D2LoRA)", seeds))
    return "\n".join(lines)


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def render_markdown(exp: Experiment, coll: Collection, specs: list[TableSpec]) -> str:
    planned, done, missing = len(coll.planned), len(coll.done), coll.missing
    out = [f"# D2LoRA results: {exp.name}", "",
           f"**{done} of {planned} planned cells done** ({len(missing)} missing"
           + (f"; {len(coll.unplanned)} finished cells are not in the current plan" if coll.unplanned else "")
           + ").", "",
           "Metrics in %: mean ± sample std over seeds (the value alone when one seed finished). "
           "Δ = D2LoRA − LoRA in percentage points, with a 95% bootstrap interval over seeds in brackets "
           f"(seeds resampled within each init, {RESAMPLES} resamples, numpy seed {BOOTSTRAP_SEED}, "
           f"level {LEVEL:.0%}). {MISSING} = not finished yet. n = 0 is the untrained base model (LoRA) "
           "or the warm-up adapter alone (D2LoRA), shared by every method.", ""]
    task = None
    for spec in specs:
        if spec.task != task:
            task = spec.task
            out += [f"## Task: {task}", ""]
        metrics = ", ".join(label for _, label in spec.metrics)
        out += [f"### {spec.title}: {metrics}", "", render_table(spec, coll), ""]
    if missing:
        out += [f"<details><summary>Missing cells ({len(missing)})</summary>", "",
                *[f"- {m}" for m in missing], "", "</details>", ""]
    return "\n".join(out)


def render_csv(rows: list[Row]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(Row.CSV_COLUMNS)
    writer.writerows(r.as_csv() for r in sorted(rows, key=lambda r: (r.cell_id, r.suite, r.metric)))
    return buf.getvalue()
