"""Tuned arms: each arm's setting chosen on the validation split, then run on the test suites.

A grid block with `tune` plans, per arm (task, method, init and its axes, n), one selection cell per
point of its axes and tune seed (sweep/grid.selection_cells), evaluated on `tune.suite` alone: a
validation-split suite, so selection never reads a test item. The block's own cells (the final ones)
start once every selection cell of their arm has a result, and train with the chosen setting.

The rule (docs/choices.md): the highest mean of `tune.metric` over the tune seeds wins; equal means go to
the smaller learning rate, then to fewer steps (min_steps, then epochs). Each arm is chosen on its own
scores, so LoRA and D2LoRA each get their best setting. The choice and every setting's scores are recorded
in `<run>/tuning/<arm group>.json` and in the final cell's result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from d2lora_dist.config import Experiment, TrainSettings, TuneConfig
from d2lora_dist.errors import InputError, MissingInput
from d2lora_dist.evaluate.suites import SUITES
from d2lora_dist.fileio import read_json
from d2lora_dist.layout import RunLayout
from d2lora_dist.sweep.grid import Cell, selection_cells
from d2lora_dist.sweep.tune_axes import TuneSetting, setting_named, tie_order, tune_settings

RULE = ("highest mean validation metric over the tune seeds; ties: smaller learning rate, then fewer steps "
        "(min_steps, then epochs)")


def block_tune(exp: Experiment, cell: Cell) -> TuneConfig:
    tune = exp.grid[cell.tune].tune if cell.tune is not None and cell.tune < len(exp.grid) else None
    if tune is None:
        raise InputError(f"[{cell.id}] is planned as a tuned cell of grid[{cell.tune}], which has no `tune`; "
                         "the plan and the experiment disagree")
    return tune


def tune_metric(exp: Experiment, tune: TuneConfig) -> str:
    """The metric that decides: the block's, else the suite kind's headline (its table's first)."""
    return tune.metric or SUITES[exp.suites[tune.suite].kind].table[0][0]


def group_of(cell: Cell) -> str:
    """The arm a selection decides for: the final cells' id without the seed (one file per arm)."""
    return f"{cell.task}-{cell.method}-{cell.arm}-n{cell.n}"


@dataclass(frozen=True)
class Choice:
    """Validation scores per setting (seed -> value) and the setting the rule picks."""

    suite: str
    metric: str
    seeds: tuple[int, ...]
    settings: tuple[TuneSetting, ...]
    scores: dict[str, dict[int, float]]
    chosen: TuneSetting | None  # None: some selection cell has no result yet (a report's partial view)

    def mean(self, label: str) -> float | None:
        values = self.scores.get(label)
        return sum(values.values()) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {"rule": RULE, "suite": self.suite, "metric": self.metric, "seeds": list(self.seeds),
                "settings": [s.to_dict() | {"scores": {str(k): v for k, v in self.scores.get(s.label, {}).items()},
                                            "mean": self.mean(s.label)} for s in self.settings],
                "selected": self.chosen.to_dict() if self.chosen else None}


def choose(settings: list[TuneSetting], scores: dict[str, dict[int, float]], base: TrainSettings) -> TuneSetting:
    """The rule: best mean validation score; among equal means the smaller learning rate, then fewer steps."""
    def key(setting: TuneSetting) -> tuple:
        values = scores[setting.label]
        return (-sum(values.values()) / len(values), *tie_order(setting, base))

    return min(settings, key=key)


def validation_scores(exp: Experiment, layout: RunLayout, cell: Cell, partial: bool = False) -> Choice:
    """Read the selection cells' results (validation suite only) and apply the rule; a selection cell without
    a result stops the final cell, naming it (`partial`: it is left out, and nothing is chosen)."""
    tune = block_tune(exp, cell)
    metric = tune_metric(exp, tune)
    scores: dict[str, dict[int, float]] = {}
    for sel in selection_cells(exp, cell):
        path = layout.cell_result(sel.id)
        if not path.is_file() and partial:
            continue
        if not path.is_file():
            raise MissingInput(f"[{cell.id}] takes its setting from selection cell {sel.id}, but {path} does not "
                               f"exist; run `d2lora sweep cell --cell {sel.id}` (or the sweep) first")
        value = read_json(path).get("metrics", {}).get(tune.suite, {}).get(metric)
        if not isinstance(value, (int, float)):
            raise InputError(f"{path}: metrics.{tune.suite}.{metric} is missing or not a number")
        scores.setdefault(sel.setting, {})[sel.seed] = float(value)
    settings = tune_settings(tune)
    complete = all(len(scores.get(s.label, {})) == len(tune.seeds) for s in settings)
    chosen = choose(settings, scores, exp.methods[cell.method]) if complete else None
    return Choice(tune.suite, metric, tuple(tune.seeds), tuple(settings), scores, chosen)


def cell_settings(exp: Experiment, layout: RunLayout, cell: Cell) -> tuple[TrainSettings, dict[str, Any] | None]:
    """The training settings of a cell, and for a tuned one what chose them (recorded with its result):
    an untuned cell the method's; a selection cell its point of the axes; a final cell the chosen point."""
    base = exp.methods[cell.method]
    if cell.tune is None:
        return base, None
    if cell.selects:
        setting = setting_named(block_tune(exp, cell), cell.setting)
        return setting.applied(base), {"role": "selection", "setting": setting.to_dict()}
    choice = validation_scores(exp, layout, cell)
    assert choice.chosen is not None  # every selection cell has its result (validation_scores raised otherwise)
    return choice.chosen.applied(base), {"role": "final", "group": group_of(cell)} | choice.to_dict()


def tuned_arms(cells: list[Cell]) -> dict[str, Cell]:
    """One final cell per tuned arm (group_of), in plan order."""
    arms: dict[str, Cell] = {}
    for cell in cells:
        if cell.tuned:
            arms.setdefault(group_of(cell), cell)
    return arms


def plan_lines(exp: Experiment, cells: list[Cell]) -> list[str]:
    """What `sweep plan` says of each tuned arm: its settings, selection cells, and the final cells that wait."""
    lines = []
    finals: dict[str, list[Cell]] = {}
    for cell in cells:
        if cell.tuned:
            finals.setdefault(group_of(cell), []).append(cell)
    for group, members in finals.items():
        tune = block_tune(exp, members[0])
        selection = [c.id for c in selection_cells(exp, members[0])]
        lines.append(f"tuned arm {group} (grid[{members[0].tune}].tune): {len(tune_settings(tune))} setting(s) "
                     f"({', '.join(s.label for s in tune_settings(tune))}) x tune seeds {tune.seeds} on suite "
                     f"{tune.suite} ({tune_metric(exp, tune)}): {len(selection)} selection cell(s) "
                     f"[{', '.join(selection)}]; final cells {', '.join(c.id for c in members)} wait for them")
    return lines
