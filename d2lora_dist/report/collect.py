"""Read every finished cell's result.json and line it up against the plan.

A cell is done when `cells/<cell-id>/result.json` exists (it is written last, atomically);
a planned cell without one is missing. Values are fractions in [0, 1]; anything else is a
corrupt result and stops the report with the file and key named.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d2lora_dist.config import Experiment
from d2lora_dist.errors import InputError
from d2lora_dist.evaluate.suites import UNRECORDED, recorded_versions
from d2lora_dist.layout import RunLayout
from d2lora_dist.report.budgets import CellBudget, read_budget
from d2lora_dist.sweep.grid import NO_TRAINING, Cell, plan_cells

Role = str  # "task" | "forgetting"
NOT_METRICS = frozenset({"items"})  # counts stored beside the metrics


@dataclass(frozen=True)
class Row:
    """One cell x metric: a line of results.csv."""

    cell_id: str
    task: str
    method: str
    init: str
    n: int
    seed: int
    suite: str
    role: Role
    metric: str
    value: float
    arm: str = ""  # the init with its axes (sweep/grid.Cell.arm); the init itself without them
    n_trained: int | None = None  # rows trained after the length filter; None = not recorded
    prompt_version: str = UNRECORDED  # how the number was made (evaluate.suites.recorded_versions)
    scorer_version: str = UNRECORDED
    code: str = UNRECORDED  # the code that made the cell (provenance.code_version()["version"])

    CSV_COLUMNS = ("cell_id", "task", "method", "init", "n", "seed", "suite", "role", "metric", "value", "arm",
                   "n_trained", "prompt_version", "scorer_version", "code")

    def as_csv(self) -> list[Any]:
        return ["" if getattr(self, c) is None else getattr(self, c) for c in self.CSV_COLUMNS]


@dataclass
class Collection:
    planned: list[Cell]
    finished: dict[str, Cell]
    rows: list[Row]
    _values: dict[tuple, dict[int, float]] = field(default_factory=dict, repr=False)
    budgets: dict[str, CellBudget] = field(default_factory=dict)  # cell id -> its recorded budget (report.budgets)

    @property
    def done(self) -> list[str]:
        return [c.id for c in self.planned if c.id in self.finished]

    @property
    def missing(self) -> list[str]:
        return [c.id for c in self.planned if c.id not in self.finished]

    @property
    def unplanned(self) -> list[str]:
        planned = {c.id for c in self.planned}
        return sorted(i for i in self.finished if i not in planned)

    def cells(self) -> list[Cell]:
        """Planned and finished cells, each once."""
        return sorted({c.id: c for c in [*self.planned, *self.finished.values()]}.values())

    def values(self, task: str, method: str, arm: str, n: int, suite: str, metric: str) -> list[float]:
        """Metric values over seeds (seed order); n = 0 cells (method none) serve every method."""
        by_seed = self.by_seed(task, method, arm, n, suite, metric)
        return [by_seed[s] for s in sorted(by_seed)]

    def by_seed(self, task: str, method: str, arm: str, n: int, suite: str, metric: str) -> dict[int, float]:
        """seed -> metric value of the finished cells of one table cell (an arm: sweep/grid.Cell.arm)."""
        return dict(self._values.get((task, cell_method(method, n), arm_at(arm, n), n, suite, metric), {}))

    def budgets_at(self, task: str, method: str, arm: str, n: int) -> list[CellBudget]:
        """The recorded budgets of the finished cells behind a table's (arm, n), in seed order."""
        key = (task, cell_method(method, n), arm_at(arm, n), n)
        return [self.budgets[c.id] for c in sorted(self.finished.values(), key=lambda c: c.seed)
                if (c.task, c.method, c.arm, c.n) == key and c.id in self.budgets]

    def cell_id(self, task: str, method: str, arm: str, n: int, seed: int) -> str:
        """The id of the cell behind one seed of a table cell."""
        from d2lora_dist.report.arms import Arm

        a = Arm.parse(arm_at(arm, n))
        return Cell(task, cell_method(method, n), a.init, n, seed, a.warmup, a.lora_init).id

    def arms(self, task: str | None = None) -> list[str]:
        """The arms of the planned and finished cells (of one task), vanilla first."""
        from d2lora_dist.report.arms import ordered_arms

        return ordered_arms({c.arm for c in self.cells() if task is None or c.task == task})

    def metrics(self, task: str, suite: str) -> list[str]:
        """Metrics some finished cell of the task reports for the suite, sorted."""
        return sorted({r.metric for r in self.rows if r.task == task and r.suite == suite})

    def n_label(self, task: str, method: str, n: int) -> str:
        """n as a table column shows it: "16", or "16 (15 trained)" when the finished cells at n trained
        on fewer rows (prompts that fill max_length are dropped); a range when they differ."""
        trained = self.n_trained(task, method, n)
        return str(n) if trained in ("", str(n)) else f"{n} ({trained} trained)"

    def n_trained(self, task: str, method: str, n: int, arms: tuple[str, ...] = (),
                  seeds: tuple[int, ...] = ()) -> str:
        """The rows the finished cells at n trained on ("15", or "14–16" when they differ; "" when no
        cell recorded it), over the given arms and seeds (all when empty)."""
        at = {arm_at(a, n) for a in arms}
        trained = sorted({r.n_trained for r in self.rows if (r.task, r.method, r.n) == (task, cell_method(method, n), n)
                          and r.n_trained is not None and (not at or r.arm in at) and (not seeds or r.seed in seeds)})
        return "" if not trained else str(trained[0]) if len(trained) == 1 else f"{trained[0]}–{trained[-1]}"

    def seeds(self, task: str, method: str, init: str, n: int) -> tuple[int, int]:
        """(finished, planned) seeds of one table cell."""
        key_method = cell_method(method, n)
        match = [c for c in self.cells() if (c.task, c.method, c.arm, c.n) == (task, key_method, arm_at(init, n), n)]
        planned = {c.id for c in self.planned}
        return (sum(c.id in self.finished for c in match), sum(c.id in planned for c in match))


def arm_at(arm: str, n: int) -> str:
    """The arm of the cells behind a table's (arm, n): a vanilla n = 0 cell is the base model whatever
    its LoRA init, so it is planned once, with the default (sweep/grid.Cell.requested); so is
    lora_matched's (nothing trained: the base model too)."""
    from d2lora_dist.inits import BASELINE, INITS
    from d2lora_dist.report.arms import Arm

    a = Arm.parse(arm)
    if n == 0 and not a.from_warmup:
        return Arm(a.init).name
    return Arm(BASELINE).name if n == 0 and a.init in INITS and INITS[a.init].at_n0 == "base" else arm


def cell_method(method: str, n: int) -> str:
    """The method in the id of the cells behind a table's (method, n): n = 0 cells are shared."""
    return NO_TRAINING if n == 0 else method


def collect(exp: Experiment, layout: RunLayout) -> Collection:
    cells = plan_cells(exp)
    planned = [c for c in cells if not c.selects]  # selection cells are scored on validation: report/tuning.py
    selection = {c.id for c in cells if c.selects}
    finished: dict[str, Cell] = {}
    rows: list[Row] = []
    budgets: dict[str, CellBudget] = {}
    cells_dir = layout.cells_dir
    for cell_dir in sorted(cells_dir.iterdir()) if cells_dir.is_dir() else []:
        path = cell_dir / "result.json"
        if not path.is_file() or cell_dir.name in selection:
            continue  # not done (yet): the plan lists it as missing
        cell, cell_rows, budget = read_result(path, exp)
        if cell.selects:
            continue  # scored on the validation split: the tuned-settings section reads it, not the tables
        finished[cell.id] = cell
        rows.extend(cell_rows)
        if budget is not None:
            budgets[cell.id] = budget
    return collection(planned, finished, rows, budgets)


def collection(planned: list[Cell], finished: dict[str, Cell], rows: list[Row],
               budgets: dict[str, CellBudget] | None = None) -> Collection:
    """The Collection of these cells, rows and budgets (from result.json files or from an items.csv)."""
    values: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in rows:
        values[(r.task, r.method, r.arm, r.n, r.suite, r.metric)][r.seed] = r.value
    return Collection(planned, finished, rows, dict(values), dict(budgets or {}))


def read_result(path: Path, exp: Experiment) -> tuple[Cell, list[Row], CellBudget | None]:
    try:
        data = json.loads(path.read_text())
        cell = Cell.from_dict(data["cell"])
        metrics = data["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a valid result.json ({type(e).__name__}: {e}); "
                         f"delete it to re-run the cell") from e
    if cell.id != path.parent.name:
        raise InputError(f"{path}: cell.id {cell.id!r} does not match its directory {path.parent.name!r}")
    suites_roles = data.get("suites") or {}
    code = (data.get("code") or {}).get("version") or UNRECORDED
    trained = _n_trained(data, cell)
    rows = []
    for suite, values in metrics.items():
        role = suites_roles.get(suite) or _role(exp, cell.task, suite)
        versions = recorded_versions(exp.suites[suite].kind if suite in exp.suites else None, _labels(data, suite))
        for metric, value in values.items():
            if metric in NOT_METRICS:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
                raise InputError(f"{path}: metrics.{suite}.{metric} = {value!r}; expected a fraction in [0, 1]")
            rows.append(Row(cell.id, cell.task, cell.method, cell.init, cell.n, cell.seed, suite, role,
                            metric, float(value), cell.arm, trained, code=code, **versions))
    return cell, rows, read_budget(data, path)


def _labels(data: dict[str, Any], suite: str) -> dict[str, str]:
    """A suite's labels in a result.json; results from before `labels` recorded the prompt version alone."""
    labels = dict((data.get("labels") or {}).get(suite) or {})
    prompt = (data.get("prompt_versions") or {}).get(suite)
    if prompt and "prompt_version" not in labels:
        labels["prompt_version"] = prompt
    return labels


def _n_trained(data: dict[str, Any], cell: Cell) -> int | None:
    """Rows the cell trained on: recorded since `n_trained`, before that its training schedule's examples."""
    if data.get("n_trained") is not None:
        return int(data["n_trained"])
    if not cell.trains:
        return 0
    schedule = (data.get("train") or {}).get("schedule") or {}
    return int(schedule["examples"]) if "examples" in schedule else None


def _role(exp: Experiment, task: str, suite: str) -> Role:
    """A result.json without its roles: the experiment's rule (config.TaskConfig.role)."""
    return exp.tasks[task].role(suite) if task in exp.tasks else "task"
