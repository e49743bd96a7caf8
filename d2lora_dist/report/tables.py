"""Paper-style tables: per task and method, per suite (task suite, then forgetting), n as columns.

Rows are LoRA, D2LoRA and Δ (D2LoRA − LoRA); values are percentages, mean ± std over seeds;
Δ is paired (report.paired) and carries its 95% interval from the crossed seeds × items analysis,
what it rests on (seeds × items), its minimum detectable effect and its verdict
(report.verdicts); "—" marks a cell that has not finished (never 0). A power section says how
many seeds would detect `report.target_effect`.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from d2lora_dist.config import Experiment
from d2lora_dist.evaluate.suites import SUITES
from d2lora_dist.inits import BASELINE, TREATMENT
from d2lora_dist.inits import INITS as INIT_SPECS
from d2lora_dist.methods import METHODS, method_label
from d2lora_dist.report.arms import Arm
from d2lora_dist.report.budgets import MARK, describe, unequal
from d2lora_dist.report.collect import Collection, Row
from d2lora_dist.report.paired import ITEMS, NONE, SEEDS, Delta, Deltas
from d2lora_dist.report.stats import LEVEL, POWER, mean_std, seeds_to_detect
from d2lora_dist.sweep.grid import NO_TRAINING

MISSING = "—"
# table rows of an experiment without axes or controls: LoRA and D2LoRA
INITS = tuple((name, INIT_SPECS[name].label) for name in (BASELINE, TREATMENT))
ONE_SEED = "1 seed: test-set noise only"
IDENTICAL = "identical outputs"
SEED_LEVEL = "seed-level only"


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
        return f"{self.task} · {method_label(self.method)} · {self.suite} ({self.role} suite)"


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
    """The suite kind's table metrics (evaluate.suites.SUITES): the plotted one always, the others
    when some cell reports them (older results lack later metrics); deltas.csv has every one."""
    reported = {r.metric for r in coll.rows if r.suite == suite}
    if suite in exp.suites and exp.suites[suite].kind in SUITES:
        table = SUITES[exp.suites[suite].kind].table
        return table[:1] + tuple(m for m in table[1:] if m[0] in reported)
    return tuple((m, m) for m in sorted(reported))


def _tasks(exp: Experiment, coll: Collection) -> list[str]:
    seen = {c.task for c in coll.cells()}
    return [t for t in exp.tasks if t in seen] + sorted(seen - set(exp.tasks))


def _methods(coll: Collection, task: str) -> list[str]:
    methods = {c.method for c in coll.cells() if c.task == task} - {NO_TRAINING}
    if not methods:
        return [NO_TRAINING]
    return [m for m in METHODS if m in methods] + sorted(methods - set(METHODS))


def _suites(exp: Experiment, coll: Collection, task: str) -> list[tuple[str, str]]:
    configured = list(exp.tasks[task].suites) if task in exp.tasks else []
    roles = exp.tasks[task].roles() if task in exp.tasks else {}
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


def _pp(x: float) -> str:
    return f"{x * 100 + 0.0:+.2f}"


def fmt_delta(delta: Delta) -> str:
    """'+1.20 [+0.31, +2.08] · 5 seeds × 1319 items · MDE 1.10 · resolved (primary)', the value in bold
    when resolved; the verdict's words last (report.verdicts.Verdict.label)."""
    if delta.basis == NONE or delta.value is None:
        return MISSING if delta.why == "not finished" else f"{MISSING} (no seed finished for both inits)"
    seeds = len(delta.seeds)
    value = f"**{_pp(delta.value)}**" if delta.resolved else _pp(delta.value)
    parts = [value if delta.ci is None else f"{value} [{_pp(delta.ci[0])}, {_pp(delta.ci[1])}]"]
    if delta.basis == ITEMS:
        parts[0] += f" · {seeds} seed{'s' * (seeds > 1)} × {delta.items_label} items"
    elif delta.basis == SEEDS:
        parts[0] += f" · {seeds} seed{'s' * (seeds > 1)}, {SEED_LEVEL}"
    parts += [] if delta.mde is None else [f"MDE {delta.mde * 100:.2f}"]
    parts += [ONE_SEED] if delta.basis == ITEMS and seeds == 1 else []
    parts += [IDENTICAL] if delta.identical else []
    parts += [delta.verdict.label] if delta.verdict else []
    return " · ".join(parts)


def table_arms(coll: Collection, task: str) -> list[tuple[str, str]]:
    """(arm, label) rows of a task's tables: LoRA and D2LoRA, or every arm of the warm-up and LoRA-init axes."""
    arms = coll.arms(task)
    if set(arms) <= {name for name, _ in INITS}:
        return list(INITS)
    return [(arm, Arm.parse(arm).label) for arm in arms]


def render_table(spec: TableSpec, coll: Collection, deltas: Deltas, budget_ratio: float | None = None) -> str:
    """The table; with recorded budgets (report.budgets) also each arm's budget per n, and each Δ whose arms'
    budgets differ by more than `budget_ratio` marked, with a line under the table saying how."""
    lines = ["| n | " + " | ".join(coll.n_label(spec.task, spec.method, n) for n in spec.ns) + " |",
             "|---|" + "---:|" * len(spec.ns)]
    arms = table_arms(coll, spec.task)
    unequal_budgets = {} if budget_ratio is None or not coll.budgets else {
        (pair, n): why for pair in deltas.pairs(spec.task) for n in spec.ns
        if (why := unequal(coll.budgets_at(spec.task, spec.method, pair.baseline, n),
                           coll.budgets_at(spec.task, spec.method, pair.treatment, n), budget_ratio))}
    for key, label in spec.metrics:
        prefix = f"{label} " if len(spec.metrics) > 1 else ""
        for arm, arm_label in arms:
            vals = [coll.values(spec.task, spec.method, arm, n, spec.suite, key) for n in spec.ns]
            lines.append(_row(f"{prefix}{arm_label}", [fmt_mean_std(v) for v in vals]))
        for pair in deltas.pairs(spec.task):
            shown = [fmt_delta(deltas.get(spec.task, spec.method, n, spec.suite, key, pair)) for n in spec.ns]
            shown = [f"{text} {MARK}" if (pair, n) in unequal_budgets and not text.startswith(MISSING) else text
                     for text, n in zip(shown, spec.ns, strict=True)]
            lines.append(_row(f"{prefix}Δ ({pair.label})", shown))
    seeds = []
    for n in spec.ns:
        counts = [coll.seeds(spec.task, spec.method, arm, n) for arm, _ in arms]
        seeds.append(" · ".join(f"{done}/{planned}" for done, planned in counts))
    lines.append(_row(f"seeds done ({' · '.join(label for _, label in arms)})", seeds))
    if coll.budgets:
        lines += [_row(f"budget {label}", [describe(coll.budgets_at(spec.task, spec.method, arm, n))
                                           for n in spec.ns]) for arm, label in arms]
    notes = [f"{MARK} {pair.label}, n = {n}: total budgets differ by more than report.budget_ratio = "
             f"{budget_ratio:g}: {why}" for (pair, n), why in unequal_budgets.items()]
    return "\n".join(lines) + "".join(f"\n\n{note}" for note in notes)


def _row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


HEADER = (
    "Metrics in %: mean ± sample std over seeds (the value alone when one seed finished). "
    "Δ = D2LoRA − LoRA in percentage points, paired: only seeds finished for both inits enter, and Δ is the "
    "mean over those seeds and the items they all answered of (D2LoRA item score − LoRA item score). In brackets "
    f"its {LEVEL:.0%} t interval from the crossed seeds × items analysis: every seed answers the same items, so "
    "the variance of Δ is σ²_seed/S + σ²_item/I + σ²_resid/(S·I), estimated from the mean squares of the "
    "seeds × items table of differences, with Satterthwaite degrees of freedom (docs/statistics.md). "
    "\"S seeds × m items\" is what Δ rests on; \"MDE\" is the |Δ| this design detects with "
    f"{POWER:.0%} power at a two-sided 5% level, from Δ's own variance components. "
    "Verdicts: a **bold** Δ is resolved. \"resolved/unresolved (primary)\": a comparison named in "
    f"`report.primary`, tested alone at {LEVEL:.0%}. \"(exploratory, Holm-adjusted p … over k Δ)\": every other "
    "Δ, resolved only when its p after Holm's correction over the k exploratory Δs of its table (every metric, "
    "pair and n; n = 0 apart) is below 0.05. \"too few seeds to resolve (k of K)\": fewer paired seeds than "
    f"`report.min_seeds`; the interval is shown, the verdict is not given. \"{ONE_SEED}\": the interval covers "
    f"the test items only (n = 0, where nothing is trained, is judged on that alone). \"{IDENTICAL}\": no item "
    f"score differs between the inits. \"{SEED_LEVEL}\": some paired cell has no per-item scores (see the "
    "notes), so the interval is a t interval over the per-seed differences (none with one seed). "
    f"{MISSING} = not finished (or no seed finished for both inits). n = 0 is the untrained base model (LoRA) "
    "or the warm-up adapter alone (D2LoRA), shared by every method. Every Δ, of every metric, is in deltas.csv. "
    "With several warm-ups (D2LoRA(m) names the warm-up) or LoRA inits (LoRA · PiSSA), each D2LoRA arm is "
    "paired with the vanilla LoRA arm of the same LoRA init, so every Δ isolates one warm-up.")


BUDGETS = (
    "Budgets: each arm's optimisation per n, over its finished seeds (a range where they differ): optimizer "
    "steps, summed learning rate (ΣLR, the scheduled rate summed over the steps that ran) and trained tokens, "
    "its own phase's and, for a warm-started arm, its warm-up's beside them (\"6 + 4 warm-up steps\"). "
    f"{MARK} marks a Δ whose arms differ in total budget (phase + warm-up), in steps or in ΣLR, by more than "
    "`report.budget_ratio`; the line under its table says which and by how much.")


def render_power(exp: Experiment, specs: list[TableSpec], deltas: Deltas) -> list[str]:
    """How many seeds would detect `report.target_effect`, for the primary comparisons and the headline
    metric's trained Δs, from each Δ's own variance components at its number of items."""
    rows = []
    for spec in specs:
        if spec.role != "task" or spec.method == NO_TRAINING:
            continue
        for pair in deltas.pairs(spec.task):
            for n in spec.ns:
                for metric, label in spec.metrics:
                    d = deltas.get(spec.task, spec.method, n, spec.suite, metric, pair)
                    headline = metric == spec.metrics[0][0]
                    if d.components is None or n == 0 or not (headline or d.key in deltas.primary):
                        continue
                    rows.append(_power_row(exp, spec, d, label))
    if not rows:
        return []
    return ["## Power", "",
            "Minimum detectable effect (MDE: 80% power, two-sided 5%) of each trained Δ of the headline metric and "
            "of every primary comparison, and the paired seeds at the same items that would detect the target "
            "effect (`report.target_effect`, by suite kind), projected from the Δ's own variance components.", "",
            "| comparison | role | seeds × items | σ seed · item · resid (pp) | MDE (pp) | target (pp) | seeds to detect |",
            "|---|---|---|---|---:|---:|---:|", *rows, ""]


def _power_row(exp: Experiment, spec: TableSpec, d: Delta, label: str) -> str:
    kind = exp.suites[spec.suite].kind if spec.suite in exp.suites else ""
    target = exp.report.target_effect.get(kind)
    items = d.items[0] if d.items else 1
    if len(d.seeds) < 2:  # one seed cannot tell seed, item and residual variance apart
        return (f"| {spec.task} {method_label(spec.method)} n={d.n} {label} ({d.pair.label}) | "
                f"{d.verdict.role if d.verdict else 'exploratory'} | 1 × {items} | — | {d.mde * 100:.2f} | "
                f"{'—' if target is None else f'{target:g}'} | — (one seed: its variance is unknown) |")
    need = None if target is None else seeds_to_detect(target / 100, d.components, items)
    c = d.components
    sds = " · ".join(f"{(x ** 0.5) * 100:.2f}" for x in (c.seed, c.item, c.resid))
    role = d.verdict.role if d.verdict else "exploratory"
    what = f"{spec.task} {method_label(spec.method)} n={d.n} {label} ({d.pair.label})"
    return (f"| {what} | {role} | {len(d.seeds)} × {items} | {sds} | {d.mde * 100:.2f} | "
            f"{'—' if target is None else f'{target:g}'} | {'—' if target is None else (need or '> 1000')} |")


def render_markdown(exp: Experiment, coll: Collection, specs: list[TableSpec], deltas: Deltas,
                    versions: list[str] | None = None, mixed: frozenset[str] = frozenset()) -> str:
    """`versions`: lines about the versions behind the cells (report.versions), shown before the tables;
    `mixed`: suites whose cells come from different prompt or scorer versions (their titles say so)."""
    from d2lora_dist.report.controls import render_controls, warmup_draw_note  # it imports this module

    planned, done, missing = len(coll.planned), len(coll.done), coll.missing
    out = [f"# D2LoRA results: {exp.name}", "",
           f"**{done} of {planned} planned cells done** ({len(missing)} missing"
           + (f"; {len(coll.unplanned)} finished cells are not in the current plan" if coll.unplanned else "")
           + ").", "", HEADER, "", *([BUDGETS, ""] if coll.budgets else []), *warmup_draw_note(coll),
           *(versions or [])]
    task = None
    for spec in specs:
        if spec.task != task:
            task = spec.task
            out += [f"## Task: {task}", ""]
        metrics = ", ".join(label for _, label in spec.metrics)
        flag = " · MIXED VERSIONS" if spec.suite in mixed else ""
        out += [f"### {spec.title}: {metrics}{flag}", "", render_table(spec, coll, deltas, exp.report.budget_ratio), ""]
    out += render_controls(coll, specs, deltas)
    out += render_power(exp, specs, deltas)
    if notes := deltas.notes():
        out += ["## Notes on Δ", "", "Missing or unreadable predictions make every Δ that uses the cell "
                f"{SEED_LEVEL}; seeds without the other init are left out.", "", *[f"- {n}" for n in notes], ""]
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
