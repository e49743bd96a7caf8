"""The grid of cells: task x method x init (x warm-up x LoRA init) x n x seed, with stable readable ids.

n = 0 cells train nothing, so they do not depend on the method (or the seed): they are
planned once per (task, init, warm-up) with method "none" and every method's table uses them.
A vanilla n = 0 cell is the base model whatever its LoRA init (every init starts at the base's
function), so it is planned once, with the default.

Ids keep the shape they had before the axes: `task-method-init-nN-sS`, where init grows
`@warm-up` for a named warm-up (not for an experiment's single `warmup`) and `+lora_init` for a
LoRA init other than the default: `titles-sft-d2lora@m384+pissa-n16-s0`. The controls (inits.py)
are inits like any other: `titles-sft-random_b-n16-s0`.

A warm-up with `seeds: per_cell` is trained once per cell seed: a D2LoRA cell of seed s starts from
warm-up s, and its n = 0 cells keep their seed (each evaluates its own warm-up draw).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace

from d2lora_dist.config import SINGLE_WARMUP, Experiment, GridBlock
from d2lora_dist.errors import UnknownName
from d2lora_dist.inits import BASELINE, INITS
from d2lora_dist.lora_inits import DEFAULT_LORA_INIT
from d2lora_dist.methods import NO_TRAINING
from d2lora_dist.schema import ConfigError
from d2lora_dist.sweep.tune_axes import tune_settings

__all__ = ["NO_TRAINING", "Cell", "WarmupRun", "arm_name", "plan_cells", "find_cell", "needs_warmup", "warmup_runs",
           "cell_suites", "selection_cells"]


def arm_name(init: str, warmup: str, lora_init: str) -> str:
    """An init with its axes, as ids, tags and tables name it: d2lora, d2lora@m384+pissa, lora+olora
    (the single warm-up and PEFT's default init are not spelled out)."""
    named = f"@{warmup}" if warmup and warmup != SINGLE_WARMUP else ""
    axis = f"+{lora_init}" if lora_init != DEFAULT_LORA_INIT else ""
    return f"{init}{named}{axis}"


PLACEBO = "placebo"
_SEED_SUFFIX = re.compile(r"^(.*)-s(\d+)$")


@dataclass(frozen=True, order=True)
class WarmupRun:
    """One warm-up artifact to train: a named warm-up started from one LoRA init, on its own data or on
    the placebo (responses shuffled across prompts), with its configured seed or a cell's (`seeds: per_cell`)."""

    name: str
    lora_init: str = DEFAULT_LORA_INIT
    placebo: bool = False
    seed: int | None = None  # None: the warm-up's own `seed` (one draw shared by every cell)

    @property
    def key(self) -> str:
        """Its directory, job and artifact name: the warm-up's name, `+lora_init` unless the default,
        `+placebo` for the placebo, `-sS` for the warm-up of cell seed S."""
        key = self.name if self.lora_init == DEFAULT_LORA_INIT else f"{self.name}+{self.lora_init}"
        key += f"+{PLACEBO}" if self.placebo else ""
        return key if self.seed is None else f"{key}-s{self.seed}"

    @classmethod
    def parse(cls, key: str) -> WarmupRun:
        m = _SEED_SUFFIX.match(key)
        rest, seed = (m.group(1), int(m.group(2))) if m else (key, None)
        name, *parts = rest.split("+")
        lora_inits = [p for p in parts if p != PLACEBO]
        return cls(name, lora_inits[0] if lora_inits else DEFAULT_LORA_INIT, PLACEBO in parts, seed)

    def sort_key(self) -> tuple:
        return (self.name, self.lora_init, self.placebo, -1 if self.seed is None else self.seed)


@dataclass(frozen=True, order=True)
class Cell:
    task: str
    method: str  # sft | dpo | orpo | none (n = 0)
    init: str  # lora | d2lora
    n: int
    seed: int
    warmup: str = ""  # the warm-up a D2LoRA cell starts from ("" = none: a vanilla cell)
    lora_init: str = DEFAULT_LORA_INIT  # PEFT's factor init of the fresh adapter (or of its warm-up)
    # The suites a grid block restricts the cell to (empty = the task's); not part of its identity.
    suites: tuple[str, ...] = field(default=(), compare=False)
    # its warm-up is trained per cell seed (`warmup.seeds: per_cell`): it starts from warm-up `seed`
    warmup_per_seed: bool = field(default=False, compare=False)
    # A tuned block's cells (sweep/tuning.py): `setting` labels a selection cell (trained at that point of
    # the block's axes, scored on the validation split only); a final cell has none and takes the setting
    # its selection cells chose. `tune` is the index of the grid block whose axes these are.
    setting: str = ""
    tune: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # a D2LoRA cell named without its warm-up starts from the experiment's single one
        if not self.warmup and self.init in INITS and INITS[self.init].from_warmup:
            object.__setattr__(self, "warmup", SINGLE_WARMUP)

    @property
    def id(self) -> str:
        tried = f"-tune-{self.setting}" if self.setting else ""
        return f"{self.task}-{self.method}-{self.arm}-n{self.n}{tried}-s{self.seed}"

    @property
    def selects(self) -> bool:
        """A selection cell: trained at one tuning setting, evaluated on the validation split only."""
        return bool(self.setting)

    @property
    def tuned(self) -> bool:
        """A final cell of a tuned block: its settings are chosen by its selection cells."""
        return self.tune is not None and not self.setting

    @property
    def arm(self) -> str:
        return arm_name(self.init, self.warmup, self.lora_init)

    @property
    def warmup_run(self) -> WarmupRun | None:
        """The warm-up artifact this cell starts from or reads (None for a vanilla cell, and for
        lora_matched, which takes only the warm-up's step count from its settings)."""
        spec = INITS.get(self.init)
        if not self.warmup or spec is None or not spec.needs_warmup_adapter:
            return None
        return WarmupRun(self.warmup, self.lora_init, spec.placebo, self.seed if self.warmup_per_seed else None)

    @property
    def trains(self) -> bool:
        return self.n > 0

    def to_dict(self) -> dict:
        data = {"id": self.id, **asdict(self)}
        if self.suites:
            data["suites"] = list(self.suites)
        else:
            del data["suites"]  # plans and results of unrestricted cells read as before
        # so do those of experiments without the axes (one warm-up, PEFT's default init)
        if not self.warmup or self.warmup == SINGLE_WARMUP:
            del data["warmup"]
        if self.lora_init == DEFAULT_LORA_INIT:
            del data["lora_init"]
        if not self.warmup_per_seed:
            del data["warmup_per_seed"]
        for key in ("setting", "tune"):  # untuned cells read as before
            if data[key] in ("", None):
                del data[key]
        return data

    @classmethod
    def requested(cls, task: str, method: str, init: str, n: int, seed: int, warmup: str = SINGLE_WARMUP,
                  lora_init: str = DEFAULT_LORA_INIT, warmup_per_seed: bool = False) -> Cell | None:
        """The cell a request names: n = 0 trains nothing, so it is method "none", seed 0 (the seed of its
        warm-up draw when warm-ups are per seed), for every method; a vanilla cell has no warm-up, and at
        n = 0 it is the base model whatever its LoRA init (lora_matched too); random_b has no n = 0 (None)."""
        spec = INITS[init]
        warmup = warmup if spec.from_warmup else ""
        per_seed = warmup_per_seed and spec.needs_warmup_adapter
        if n == 0:
            if spec.at_n0 == "none":
                return None
            if spec.at_n0 == "base":
                return cls(task, NO_TRAINING, BASELINE, 0, 0)
            return cls(task, NO_TRAINING, init, 0, seed if per_seed else 0, warmup, lora_init,
                       warmup_per_seed=per_seed)
        return cls(task, method, init, n, seed, warmup, lora_init, warmup_per_seed=per_seed)

    @classmethod
    def from_dict(cls, data: dict) -> Cell:
        from_warmup = data["init"] in INITS and INITS[data["init"]].from_warmup
        return cls(task=data["task"], method=data["method"], init=data["init"], n=int(data["n"]),
                   seed=int(data["seed"]), warmup=data.get("warmup") or (SINGLE_WARMUP if from_warmup else ""),
                   lora_init=data.get("lora_init") or DEFAULT_LORA_INIT, suites=tuple(data.get("suites") or ()),
                   warmup_per_seed=bool(data.get("warmup_per_seed")), setting=data.get("setting") or "",
                   tune=data.get("tune"))


def plan_cells(exp: Experiment) -> list[Cell]:
    """Every cell of the experiment, deduplicated, in a stable order."""
    cells: dict[str, Cell] = {}
    suites: dict[str, set[str] | None] = {}  # None: some block asks for every suite of the task
    blocks: dict[str, int] = {}  # the first block that asks for each cell
    for i, block in enumerate(exp.grid):
        for init, warmup, lora_init in _arms(exp, block):
            for n in block.n:
                for method in block.methods:
                    for seed in block.seeds:
                        cell = Cell.requested(block.task, method, init, n, seed, warmup, lora_init,
                                              per_seed_warmup(exp, warmup))
                        if cell is None:
                            continue
                        if block.tune is not None and cell.trains:
                            cell = replace(cell, tune=i)
                        _one_source(cells, blocks, cell, i)
                        cells.setdefault(cell.id, cell)
                        blocks.setdefault(cell.id, i)
                        asked = suites.get(cell.id, set())
                        suites[cell.id] = None if asked is None or block.suites is None else asked | set(block.suites)
    restricted = [_restrict(exp, cell, suites[cell.id]) for cell in cells.values()]
    selection = [c for cell in restricted if cell.tuned for c in selection_cells(exp, cell)]
    return sorted([*restricted, *{c.id: c for c in selection}.values()], key=_order)


def _one_source(cells: dict[str, Cell], blocks: dict[str, int], cell: Cell, i: int) -> None:
    """A cell's settings come from one place: a tuned block's trained cells are in no other block."""
    other = cells.get(cell.id)
    if other is None or blocks[cell.id] == i or (other.tune is None and cell.tune is None):
        return
    tuned, plain = (i, blocks[cell.id]) if cell.tune is not None else (blocks[cell.id], i)
    raise ConfigError([f"grid[{tuned}].tune: cell {cell.id} is also planned by grid[{plain}]; a tuned cell takes "
                       "its settings from its own block only (give the blocks different n or seeds)"])


def selection_cells(exp: Experiment, cell: Cell) -> list[Cell]:
    """The cells that choose a final cell's setting: every point of its block's axes at every tune seed,
    evaluated on the tune suite alone (their ids name the setting)."""
    if not cell.tuned:
        return []
    tune = exp.grid[cell.tune].tune
    return [replace(cell, seed=seed, setting=setting.label, suites=(tune.suite,))
            for setting in tune_settings(tune) for seed in tune.seeds]


def _arms(exp: Experiment, block: GridBlock) -> list[tuple[str, str, str]]:
    """(init, warm-up, LoRA init) of a block: each D2LoRA init once per warm-up it names."""
    warmups = block.warmups if block.warmups is not None else list(exp.warmup_configs())
    return [(init, warmup, lora_init) for init in block.inits for lora_init in block.lora_inits
            for warmup in (warmups if INITS[init].from_warmup else [""])]


def per_seed_warmup(exp: Experiment, warmup: str) -> bool:
    """Whether warm-up `warmup` is trained once per cell seed (`seeds: per_cell`)."""
    cfg = exp.warmup_configs().get(warmup) if warmup else None
    return cfg is not None and cfg.seeds == "per_cell"


def _restrict(exp: Experiment, cell: Cell, asked: set[str] | None) -> Cell:
    task_suites = exp.tasks[cell.task].suites if cell.task in exp.tasks else []
    if asked is None or asked >= set(task_suites):
        return cell
    return replace(cell, suites=tuple(s for s in task_suites if s in asked))  # the task's order: metric first


def cell_suites(exp: Experiment, cell: Cell) -> list[str]:
    """The suites a cell evaluates: its block's restriction, else every suite of its task."""
    return list(cell.suites) if cell.suites else list(exp.tasks[cell.task].suites)


def _order(cell: Cell) -> tuple:
    # a tuned block's final cells after every other: a run in plan order meets their selection cells first
    return (cell.tuned, cell.task, cell.n, cell.method, cell.lora_init, cell.init, cell.warmup, cell.seed, cell.setting)


def find_cell(exp: Experiment, cell_id: str) -> Cell:
    for cell in plan_cells(exp):
        if cell.id == cell_id:
            return cell
    raise UnknownName(f"cell {cell_id!r} is not in the plan of experiment {exp.name!r}")


def needs_warmup(cells: list[Cell]) -> bool:
    return any(c.warmup_run is not None for c in cells)


def warmup_runs(cells: list[Cell]) -> list[WarmupRun]:
    """The warm-up artifacts these cells start from, each once, in a stable order."""
    return sorted({c.warmup_run for c in cells if c.warmup_run is not None}, key=WarmupRun.sort_key)
