"""items.csv: every number a report rests on, in one file, so the report can be rebuilt from it alone.

One row per (cell, suite, metric) with an empty `item`: the cell's value as its result.json records
it (what results.csv shows), with a `note` when the report cannot use the cell's per-item scores for
that metric (the reason it gives in its notes). Then one row per item: that item's score, read from
the cell's predictions file (what the paired intervals resample). A planned cell that has not
finished is one row with status `missing` and no suite, metric or score. Every row carries the
cell's columns (task, method, init, arm, n, n_trained, seed) and the suite's (kind, role,
prompt_version, scorer_version), so a reader can select any Δ's items with a filter.

`d2lora report` on a run directory writes it as report/items.csv; `d2lora report --items FILE --out
DIR` rebuilds results.csv, deltas.csv, results.md and the plots from it, without a run directory,
an experiment file or a model. Bad input stops with the line and column named.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2lora_dist.errors import InputError, MissingInput
from d2lora_dist.report.arms import Arm
from d2lora_dist.report.budgets import CellBudget
from d2lora_dist.report.collect import Collection, Row, collection
from d2lora_dist.report.paired import ItemScores
from d2lora_dist.report.verdicts import Judging
from d2lora_dist.sweep.grid import Cell

COLUMNS = ("cell", "suite", "item", "metric", "score", "task", "method", "init", "arm", "n", "n_trained", "seed",
           "kind", "role", "status", "prompt_version", "scorer_version", "code", "experiment", "note")
DONE, MISSING, UNPLANNED = "done", "missing", "unplanned"  # status: finished and planned, planned only, finished only
SETTINGS = "settings"  # status of the one row whose note holds how Δs are judged (report.verdicts.Judging)
CELL_VALUE = ""  # the `item` of a cell's own value


# ---- what the rebuilt report needs from an experiment -------------------------------------------

@dataclass(frozen=True)
class SuiteView:
    kind: str


@dataclass
class TaskView:
    suites: list[str]
    _roles: dict[str, str]

    def roles(self) -> dict[str, str]:
        return dict(self._roles)

    def role(self, suite: str) -> str:
        return self._roles.get(suite, "task")


@dataclass
class StudyView:
    """The parts of an Experiment a report reads (name, tasks with their suites and roles, suite kinds),
    as an items.csv records them; the report's tables take it in place of the experiment."""

    name: str
    report: Judging
    tasks: dict[str, TaskView] = field(default_factory=dict)
    suites: dict[str, SuiteView] = field(default_factory=dict)

    def warmup_configs(self) -> dict:
        return {}  # an items.csv does not record the warm-ups' sizes (the Δ-against-m plots need them)


@dataclass
class Study:
    view: StudyView
    coll: Collection
    scores: ItemScores


# ---- writing -------------------------------------------------------------------------------------

def render_items_csv(name: str, kinds: dict[str, str], task_order: list[str], coll: Collection,
                     scores: ItemScores, judging: Judging) -> str:
    """items.csv of a report: `kinds` are the suites' kinds, `task_order` the experiment's tasks; its first row
    (status settings) records `judging`, so a rebuilt report labels every Δ as this one does."""
    order = {task: i for i, task in enumerate(task_order)}
    rows_of: dict[str, list[Row]] = {}
    for r in coll.rows:
        rows_of.setdefault(r.cell_id, []).append(r)
    planned = {c.id for c in coll.planned}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    budgets = {cell_id: b.to_json() for cell_id, b in sorted(coll.budgets.items())}  # report.budgets
    _write_row(writer, {"status": SETTINGS, "experiment": name,
                        "note": json.dumps(judging.to_json() | {"budgets": budgets}, sort_keys=True,
                                           separators=(",", ":"))})
    unplanned = sorted((coll.finished[i] for i in coll.unplanned), key=lambda c: c.id)
    # the plan's order within each task (a rebuilt report lists missing cells as this one does)
    for cell in sorted([*coll.planned, *unplanned], key=lambda c: order.get(c.task, len(order))):
        status = MISSING if cell.id not in coll.finished else (DONE if cell.id in planned else UNPLANNED)
        base = {"cell": cell.id, "task": cell.task, "method": cell.method, "init": cell.init, "arm": cell.arm,
                "n": cell.n, "seed": cell.seed, "status": status, "experiment": name}
        if status == MISSING:
            _write_row(writer, base)
            continue
        for r in rows_of.get(cell.id, []):  # result.json order: suites as the task lists them
            suite = {"suite": r.suite, "kind": kinds.get(r.suite, ""), "role": r.role, "n_trained": r.n_trained,
                     "prompt_version": r.prompt_version, "scorer_version": r.scorer_version, "code": r.code}
            per_item = scores.get(cell.id, r.suite, r.metric)
            note = per_item if isinstance(per_item, str) and _stated(scores, cell.id, r.suite, r.metric) else ""
            _write_row(writer, base | suite | {"metric": r.metric, "item": CELL_VALUE, "score": repr(r.value),
                                               "note": note})
            for item, value in (scores.scores.get((cell.id, r.suite)) or {}).get(r.metric, {}).items():
                _write_row(writer, base | suite | {"metric": r.metric, "item": item, "score": repr(value)})
    return buf.getvalue()


def _write_row(writer: Any, line: dict[str, Any]) -> None:
    # repr of a float reads back as the same float: a rebuilt report computes from identical numbers
    writer.writerow(["" if line.get(c) is None else line[c] for c in COLUMNS])


def _stated(scores: ItemScores, cell_id: str, suite: str, metric: str) -> bool:
    """Whether a reason was found while reading the predictions (problem or mismatch), rather than
    derived from what is there (no such metric), which the rebuilt report derives again."""
    return (cell_id, suite) in scores.problems or (cell_id, suite, metric) in scores.mismatches


# ---- reading -------------------------------------------------------------------------------------

def read_items_csv(path: str | Path) -> Study:
    """The study an items.csv holds; InputError naming the line and column of anything bad."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"{path}: no such items file (write one with `d2lora report -c EXPERIMENT`, "
                           "which saves report/items.csv)")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise InputError(f"{path}: missing column(s) {missing}; an items.csv has the columns {list(COLUMNS)}")
        lines = list(enumerate(reader, start=2))
    if not lines:
        raise InputError(f"{path}: no rows")
    return _Reader(path).study(lines)


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        self.cells: dict[str, tuple[Cell, str, int]] = {}  # id -> (cell, status, first line)
        self.rows: list[Row] = []
        self.items: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
        self.notes: dict[tuple[str, str, str], str] = {}
        self.seen: dict[tuple[str, str, str, str], int] = {}
        self.kinds: dict[str, str] = {}
        self.roles: dict[str, dict[str, str]] = {}
        self.names: set[str] = set()
        self.judging: Judging | None = None
        self.budgets: dict[str, CellBudget] = {}

    def fail(self, lineno: int, message: str) -> InputError:
        return InputError(f"{self.path}:{lineno}: {message}")

    def study(self, lines: list[tuple[int, dict[str, str]]]) -> Study:
        for lineno, raw in lines:
            self.line(lineno, raw)
        if len(self.names) > 1:
            raise InputError(f"{self.path}: rows of several experiments ({', '.join(sorted(self.names))}); "
                             "one items.csv holds one study")
        problems, mismatches, scores = {}, {}, {}
        for (cell_id, suite, metric), note in sorted(self.notes.items()):
            if (cell_id, suite) in self.items:
                mismatches[(cell_id, suite, metric)] = note
            else:
                problems[(cell_id, suite)] = note
        for r in self.rows:
            if (r.cell_id, r.suite) not in problems:
                scores[(r.cell_id, r.suite)] = self.items.get((r.cell_id, r.suite), {})
        finished = {i: c for i, (c, status, _) in self.cells.items() if status != MISSING}
        planned = [c for c, status, _ in self.cells.values() if status != UNPLANNED]
        if self.judging is None:
            raise InputError(f"{self.path}: no row of status {SETTINGS!r} (how the report judges Δs: min_seeds, "
                             "primary comparisons, target effect); every items.csv that d2lora report writes has one")
        view = StudyView(next(iter(self.names), "items"), self.judging,
                         {task: TaskView(list(roles), roles) for task, roles in self.roles.items()},
                         {suite: SuiteView(kind) for suite, kind in self.kinds.items() if kind})
        return Study(view, collection(planned, finished, self.rows, self.budgets),
                     ItemScores(scores, dict(sorted(problems.items())), mismatches))

    def line(self, lineno: int, raw: dict[str, str]) -> None:
        if None in raw or any(v is None for v in raw.values()):
            raise self.fail(lineno, f"expected {len(COLUMNS)} fields, found another number")
        if raw["status"] == SETTINGS:
            self.settings(lineno, raw)
            return
        cell = self.cell(lineno, raw)
        self.names.add(raw["experiment"])
        self.roles.setdefault(cell.task, {})  # tasks in the order the file has them
        if raw["status"] == MISSING:
            if any(raw[c] for c in ("suite", "metric", "item", "score")):
                raise self.fail(lineno, f"cell {cell.id} has status missing but a suite, metric, item or score")
            return
        for column in ("suite", "metric"):
            if not raw[column]:
                raise self.fail(lineno, f"column {column!r} is empty (only a row of status missing has none)")
        suite, metric, item = raw["suite"], raw["metric"], raw["item"]
        key = (cell.id, suite, item, metric)
        if key in self.seen:
            raise self.fail(lineno, f"duplicate row for (cell, suite, item, metric) = {key}: line {self.seen[key]} "
                                    "has it too")
        self.seen[key] = lineno
        score = self.score(lineno, raw["score"], cell_value=item == CELL_VALUE)
        self.suite(lineno, raw)
        if item == CELL_VALUE:
            self.rows.append(Row(cell.id, cell.task, cell.method, cell.init, cell.n, cell.seed, suite, raw["role"],
                                 metric, score, cell.arm, self.integer(lineno, raw, "n_trained", optional=True),
                                 raw["prompt_version"], raw["scorer_version"], raw["code"]))
            if raw["note"]:
                self.notes[(cell.id, suite, metric)] = raw["note"]
        else:
            self.items.setdefault((cell.id, suite), {}).setdefault(metric, {})[item] = score

    def settings(self, lineno: int, raw: dict[str, str]) -> None:
        if self.judging is not None:
            raise self.fail(lineno, f"a second row of status {SETTINGS!r}")
        self.names.add(raw["experiment"])
        try:
            record = json.loads(raw["note"])
            self.judging = Judging.from_json(record)
            # cell id -> budget; an items.csv from before budgets has none
            self.budgets = {str(i): CellBudget.from_json(b) for i, b in (record.get("budgets") or {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise self.fail(lineno, f"column 'note' of the {SETTINGS!r} row is not the report's settings record "
                                    f"(min_seeds, primary, target_effect, budget_ratio, budgets): "
                                    f"{type(e).__name__}: {e}") from None

    def cell(self, lineno: int, raw: dict[str, str]) -> Cell:
        if raw["status"] not in (DONE, MISSING, UNPLANNED):
            raise self.fail(lineno, f"column 'status' is {raw['status']!r}; expected {DONE}, {MISSING} or {UNPLANNED}")
        arm = Arm.parse(raw["arm"] or raw["init"])
        cell = Cell(raw["task"], raw["method"], arm.init, self.integer(lineno, raw, "n"),
                    self.integer(lineno, raw, "seed"), arm.warmup, arm.lora_init)
        if cell.id != raw["cell"]:
            raise self.fail(lineno, f"column 'cell' is {raw['cell']!r} but task, method, arm, n and seed make "
                                    f"{cell.id!r}")
        if arm.init != raw["init"]:
            raise self.fail(lineno, f"column 'init' is {raw['init']!r} but arm {raw['arm']!r} has init {arm.init!r}")
        known = self.cells.setdefault(cell.id, (cell, raw["status"], lineno))
        if known[1] != raw["status"]:
            raise self.fail(lineno, f"cell {cell.id} has status {raw['status']!r} here, {known[1]!r} on line {known[2]}")
        return cell

    def suite(self, lineno: int, raw: dict[str, str]) -> None:
        suite, task = raw["suite"], raw["task"]
        kind = self.kinds.setdefault(suite, raw["kind"])
        if kind != raw["kind"]:
            raise self.fail(lineno, f"suite {suite!r} has kind {raw['kind']!r} here and {kind!r} before")
        role = self.roles.setdefault(task, {}).setdefault(suite, raw["role"])
        if role != raw["role"]:
            raise self.fail(lineno, f"suite {suite!r} of task {task!r} has role {raw['role']!r} here and {role!r} "
                                    "before")

    def score(self, lineno: int, text: str, cell_value: bool) -> float:
        try:
            value = float(text)
        except ValueError:
            raise self.fail(lineno, f"column 'score' is {text!r}, not a number") from None
        if not math.isfinite(value):
            raise self.fail(lineno, f"column 'score' is {text!r}, not a finite number")
        if cell_value and not 0.0 <= value <= 1.0:
            raise self.fail(lineno, f"column 'score' is {text!r}: a cell's value is a fraction in [0, 1]")
        return value

    def integer(self, lineno: int, raw: dict[str, str], column: str, optional: bool = False) -> int | None:
        if optional and raw[column] == "":
            return None
        try:
            return int(raw[column])
        except ValueError:
            raise self.fail(lineno, f"column {column!r} is {raw[column]!r}, not a whole number") from None
