"""Sizing a study from a finished pilot: the minimum detectable effect each planned comparison would
have at its planned seeds and items, from the variance components the pilot measured
(`d2lora sweep plan --power-from RUN_DIR`; docs/statistics.md).

A planned comparison is a trained Δ of the planned grid, (task, method, n, pair) on the task's task
suite, for the headline metric and the metrics `report.primary` names. Its components come from the
pilot's Δ with the same task, method, n, suite, metric and arms; a comparison the pilot did not run
says so instead of borrowing another's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from d2lora_dist.config import Experiment, load_experiment
from d2lora_dist.errors import InputError
from d2lora_dist.evaluate.suites import SUITES
from d2lora_dist.layout import RunLayout
from d2lora_dist.report.arms import Pair, pairs_of
from d2lora_dist.report.collect import collect
from d2lora_dist.report.paired import Deltas, load_item_scores
from d2lora_dist.report.stats import mde_at, seeds_to_detect
from d2lora_dist.report.verdicts import primary_keys
from d2lora_dist.sweep.grid import NO_TRAINING, plan_cells


@dataclass(frozen=True)
class PlannedPower:
    task: str
    method: str
    n: int
    suite: str
    metric: str
    treatment: str
    baseline: str
    primary: bool
    seeds: int  # planned paired seeds
    items: int | None  # planned items (the suite's limit, else the pilot's count)
    pilot: str  # "S x I" the components come from, or why there are none
    seed_sd: float | None = None  # points
    item_sd: float | None = None
    resid_sd: float | None = None
    mde: float | None = None  # points, at the planned seeds and items (80% power, two-sided 5%)
    target: float | None = None  # points (report.target_effect of the suite kind)
    seeds_for_target: int | None = None  # at the planned items; None: more than 1000 or no pilot

    def to_dict(self) -> dict:
        return asdict(self)


def plan_power(exp: Experiment, pilot_dir: Path) -> list[PlannedPower]:
    """Every planned comparison with the detectable effect the pilot's components give it."""
    pilot_file = Path(pilot_dir) / "experiment.yaml"
    if not pilot_file.is_file():
        raise InputError(f"--power-from {pilot_dir}: no experiment.yaml there (give a run directory: "
                         "<output_dir>/<name> of a run whose cells have finished)")
    pilot = load_experiment(pilot_file)
    layout = RunLayout(Path(pilot_dir))
    coll = collect(pilot, layout)
    if not coll.finished:
        raise InputError(f"--power-from {pilot_dir}: no finished cell (no cells/*/result.json)")
    deltas = Deltas(coll, load_item_scores(pilot, layout, coll))
    primary = primary_keys(exp)
    return [_row(exp, deltas, key, seeds, key in primary) for key, seeds in _planned(exp, primary).items()]


def _planned(exp: Experiment, primary: frozenset[tuple]) -> dict[tuple, int]:
    """(task, method, n, suite, metric, treatment, baseline) -> planned paired seeds, in plan order."""
    cells = [c for c in plan_cells(exp) if c.method != NO_TRAINING]
    out: dict[tuple, int] = {}
    for task in dict.fromkeys(c.task for c in cells):
        suite = exp.tasks[task].suites[0]
        headline = SUITES[exp.suites[suite].kind].table[0][0]
        mine = [c for c in cells if c.task == task]
        for pair in pairs_of(sorted({c.arm for c in mine})):
            for method, n in dict.fromkeys((c.method, c.n) for c in mine):
                seeds = {arm: {c.seed for c in mine if (c.method, c.n, c.arm) == (method, n, arm)}
                         for arm in (pair.baseline, pair.treatment)}
                paired = len(seeds[pair.baseline] & seeds[pair.treatment])
                metrics = [headline, *sorted({k[4] for k in primary if k[:4] == (task, method, n, suite)} - {headline})]
                for metric in metrics:
                    out[(task, method, n, suite, metric, pair.treatment, pair.baseline)] = paired
    return out


def _row(exp: Experiment, deltas: Deltas, key: tuple, seeds: int, is_primary: bool) -> PlannedPower:
    task, method, n, suite, metric, treatment, baseline = key
    limit = exp.suites[suite].limit
    target = exp.report.target_effect.get(exp.suites[suite].kind)
    base = PlannedPower(task, method, n, suite, metric, treatment, baseline, is_primary, seeds, limit, "", target=target)
    if task not in {c.task for c in deltas.coll.cells()}:
        return replace(base, pilot="the pilot has no such task")
    d = deltas.get(task, method, n, suite, metric, Pair(baseline, treatment))
    if d.components is None or not d.items:
        return replace(base, pilot="the pilot has no item-level Δ here")
    if len(d.seeds) < 2:
        return replace(base, pilot="the pilot has one paired seed here: its seed variance is unknown")
    items = limit or d.items[0]
    c = d.components
    need = seeds_to_detect(target / 100, c, items) if target else None
    return replace(base, items=items, pilot=f"{len(d.seeds)} x {d.items[0]}", seed_sd=100 * c.seed ** 0.5,
                    item_sd=100 * c.item ** 0.5, resid_sd=100 * c.resid ** 0.5,
                    mde=100 * mde_at(c, max(seeds, 2), items), seeds_for_target=need)


def format_power(rows: list[PlannedPower], pilot_dir: Path) -> list[str]:
    lines = [f"power from the pilot {pilot_dir}: minimum detectable effect (80% power, two-sided 5%) at the "
             "planned seeds x items, from the pilot's variance components (points)"]
    width = max([24, *(len(_what(r)) for r in rows)])
    lines.append(f"{'comparison':<{width}} {'role':<11} {'planned':>10} {'pilot':>10} {'σ seed/item/resid':>19} "
                 f"{'MDE':>6} {'target':>6} {'seeds for target':>16}")
    for r in rows:
        planned = f"{r.seeds} x {r.items if r.items is not None else '?'}"
        if r.mde is None:
            lines.append(f"{_what(r):<{width}} {'primary' if r.primary else 'exploratory':<11} {planned:>10}  {r.pilot}")
            continue
        sds = f"{r.seed_sd:.2f}/{r.item_sd:.2f}/{r.resid_sd:.2f}"
        need = "-" if r.target is None else (str(r.seeds_for_target) if r.seeds_for_target else "> 1000")
        lines.append(f"{_what(r):<{width}} {'primary' if r.primary else 'exploratory':<11} {planned:>10} "
                     f"{r.pilot:>10} {sds:>19} {r.mde:>6.2f} {'-' if r.target is None else f'{r.target:g}':>6} "
                     f"{need:>16}")
    return lines


def _what(r: PlannedPower) -> str:
    arms = "" if (r.treatment, r.baseline) == ("d2lora", "lora") else f" {r.treatment}-{r.baseline}"
    return f"{r.task} {r.method} n={r.n} {r.metric}{arms}"
