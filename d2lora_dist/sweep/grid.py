"""The grid of cells: task x method x init x n x seed, with stable readable ids.

n = 0 cells train nothing, so they do not depend on the method (or the seed): they are
planned once per (task, init) with method "none" and every method's table uses them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from d2lora_dist.config import Experiment
from d2lora_dist.errors import UnknownName
from d2lora_dist.inits import INITS
from d2lora_dist.methods import NO_TRAINING

__all__ = ["NO_TRAINING", "Cell", "plan_cells", "find_cell", "needs_warmup", "cell_suites"]


@dataclass(frozen=True, order=True)
class Cell:
    task: str
    method: str  # sft | dpo | orpo | none (n = 0)
    init: str  # lora | d2lora
    n: int
    seed: int
    # The suites a grid block restricts the cell to (empty = the task's); not part of its identity.
    suites: tuple[str, ...] = field(default=(), compare=False)

    @property
    def id(self) -> str:
        return f"{self.task}-{self.method}-{self.init}-n{self.n}-s{self.seed}"

    @property
    def trains(self) -> bool:
        return self.n > 0

    def to_dict(self) -> dict:
        data = {"id": self.id, **asdict(self)}
        if self.suites:
            data["suites"] = list(self.suites)
        else:
            del data["suites"]  # plans and results of unrestricted cells read as before
        return data

    @classmethod
    def requested(cls, task: str, method: str, init: str, n: int, seed: int) -> Cell:
        """The cell a request names: n = 0 trains nothing, so it is method "none", seed 0, for every method."""
        return cls(task, NO_TRAINING, init, 0, 0) if n == 0 else cls(task, method, init, n, seed)

    @classmethod
    def from_dict(cls, data: dict) -> Cell:
        return cls(task=data["task"], method=data["method"], init=data["init"], n=int(data["n"]),
                   seed=int(data["seed"]), suites=tuple(data.get("suites") or ()))


def plan_cells(exp: Experiment) -> list[Cell]:
    """Every cell of the experiment, deduplicated, in a stable order."""
    cells: dict[str, Cell] = {}
    suites: dict[str, set[str] | None] = {}  # None: some block asks for every suite of the task
    for block in exp.grid:
        for init in block.inits:
            for n in block.n:
                for method in block.methods:
                    for seed in block.seeds:
                        cell = Cell.requested(block.task, method, init, n, seed)
                        cells.setdefault(cell.id, cell)
                        asked = suites.get(cell.id, set())
                        suites[cell.id] = None if asked is None or block.suites is None else asked | set(block.suites)
    restricted = [_restrict(exp, cell, suites[cell.id]) for cell in cells.values()]
    return sorted(restricted, key=_order)


def _restrict(exp: Experiment, cell: Cell, asked: set[str] | None) -> Cell:
    task_suites = exp.tasks[cell.task].suites if cell.task in exp.tasks else []
    if asked is None or asked >= set(task_suites):
        return cell
    return replace(cell, suites=tuple(s for s in task_suites if s in asked))  # the task's order: metric first


def cell_suites(exp: Experiment, cell: Cell) -> list[str]:
    """The suites a cell evaluates: its block's restriction, else every suite of its task."""
    return list(cell.suites) if cell.suites else list(exp.tasks[cell.task].suites)


def _order(cell: Cell) -> tuple:
    return (cell.task, cell.n, cell.method, cell.init, cell.seed)


def find_cell(exp: Experiment, cell_id: str) -> Cell:
    for cell in plan_cells(exp):
        if cell.id == cell_id:
            return cell
    raise UnknownName(f"cell {cell_id!r} is not in the plan of experiment {exp.name!r}")


def needs_warmup(cells: list[Cell]) -> bool:
    return any(INITS[c.init].from_warmup for c in cells)
